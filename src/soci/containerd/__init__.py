"""containerd's side: its API (generated stubs in ``api``) and the client ``soci pull`` uses."""
