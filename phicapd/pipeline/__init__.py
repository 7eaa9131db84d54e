"""The durable path from a watched file to its sidecar: watch -> journal -> schedule -> write."""
