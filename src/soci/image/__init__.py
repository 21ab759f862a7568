"""Where images come from and go to: registries, OCI layouts and OCI archives."""
