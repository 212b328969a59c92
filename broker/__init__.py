"""Runs mosquitto with the project's mosquitto.conf."""
