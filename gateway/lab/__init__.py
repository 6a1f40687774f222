"""The forensic lab: replay real benchmark outcomes through the gateway and measure the router."""
