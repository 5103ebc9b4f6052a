"""REST routes of meshmgmt: `peers` (peer- and user-facing) and `admin`."""
