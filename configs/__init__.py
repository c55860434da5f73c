"""The named YAML configs (`--config NAME` reads `configs/NAME.yaml`), shipped inside the package as data so a
wheel or a non-editable install finds them as well as a source checkout does."""
