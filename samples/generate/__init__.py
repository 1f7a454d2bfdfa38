"""``guidance-generate``: every guidance method side by side on one model (:mod:`.command`) and the labelled grid
it writes (:mod:`.grid`)."""
