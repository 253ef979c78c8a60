"""`smoothkd sweep`: one YAML file, a plan of hash-named steps over the stages' run(cfg), a report."""
