"""Sending results back: deliveries in SQL, C-STORE and STOW-RS transports, the sender."""
