"""Spec files (job.yaml, campaign files): YAML read with line marks, validated into pydantic models.

One path for every spec file, so they all behave alike:

- `yamlfile.read_yaml` parses the text with PyYAML's composer, hardened (no tags, no merge keys,
  aliases bounded, nesting bounded) into plain values (mappings as dicts, sequences as tuples)
  plus the line of every value and key;
- `model.validate` checks those values against a `SpecModel` (pydantic v2, strict, unknown keys
  refused) and maps every pydantic error back to file:line and a dotted field, all at once;
- `problems.InvalidSpec` carries the problems, sorted by line; each spec module raises its own
  subclass (`acb_slurm.slurm.errors.SpecError`, `acb_slurm.campaign.errors.SpecError`);
- `fields` holds the validators the specs share (whole numbers, sizes, environment variables),
  and `model.json_schema` writes the JSON Schema of a model, so validation and schema cannot
  drift apart.

Nothing here is imported by `acb-run`: pydantic is for the commands that read spec files.
"""
