"""``guidance-evaluate``: the method x scale sweep (:mod:`.command`), its cells and per-method jobs (:mod:`.jobs`), the
sharded, resumable generation (:mod:`.shards`) and the tables, plots and grids (:mod:`.report`)."""
