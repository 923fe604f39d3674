"""The deployment report: verdict, evidence, plots and the launch command, from a study's records."""
