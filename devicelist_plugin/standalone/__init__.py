"""The standalone server: configuration and the twistd service tree."""
