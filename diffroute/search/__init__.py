"""ECAD-style evolutionary search of compute schedules: NSGA-II over [steps x blocks x components] genomes."""
