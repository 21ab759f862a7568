"""The OCI data model soci needs: media types, platforms, descriptors, manifests, layouts."""
