"""Running the app as a service process: listen, drain on SIGTERM (serving), tell systemd (systemd).

Above the app: both read the app's shared state (keys.py); ops/ holds the parts the
app itself uses (memory, metrics, logs).
"""
