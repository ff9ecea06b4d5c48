"""Store-and-forward sync of images and records to an S3, GCS or Azure bucket.

The stores write an outbox job in the same durable step as each record
(storage/outbox.py); a background worker (`worker`) drains it to a bucket
(appliance/buckets/, obstore) under deterministic object keys (`keys`), so a
retried upload overwrites itself: at-least-once delivery, exactly-once objects.
"""
