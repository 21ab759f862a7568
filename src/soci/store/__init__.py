"""soci-store: a FUSE Additional Layer Store that containers/storage mounts layers from lazily."""
