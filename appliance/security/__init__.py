"""Who may ask and how much: named API keys and TLS (auth), rate limits and body slots (limits)."""
