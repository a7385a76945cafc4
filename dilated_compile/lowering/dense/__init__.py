"""Dense attention: the site stays as it was, or runs as a ring's inner attention."""
