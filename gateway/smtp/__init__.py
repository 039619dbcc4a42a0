"""The ESMTP submission front door."""
