"""The lowest layer: the draft tree, verification, the decode loop and the interfaces of the two roles it drives
(`Target`, `Drafter`). Nothing here imports the rest of draftwise."""
