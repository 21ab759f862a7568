"""The layer filesystem: a zTOC as an inode tree, and reads served span by span."""
