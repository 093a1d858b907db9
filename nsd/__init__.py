"""The namespace helper: owns the user+net namespace, its TUN devices and listeners."""
