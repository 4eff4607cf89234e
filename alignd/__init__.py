"""alignd: the command line (``alignd serve|worker|migrate|models|demo|files|jobs``)."""
