"""The server runtime every service is built on: configuration, the server
bootstrap, channels, errors, identity, telemetry, metrics, caches and resilience.
It never imports a service, the app, or anything but the contracts and the SDK."""
