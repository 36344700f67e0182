"""Draft heads: the EAGLE-3-style model (`model`) and finding and loading the one that ships for a target (`load`)."""
