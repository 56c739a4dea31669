"""One adapter per stage: reads artifact folders, calls the library, writes a new folder."""
