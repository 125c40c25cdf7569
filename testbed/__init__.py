"""Test and demo upstream ("the cloud") for the appliance; see testbed/cloud.py."""
