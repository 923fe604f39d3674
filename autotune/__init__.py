"""autotune: the fastest Mixture-of-Experts training layout that fits a cluster, with evidence.

Its packages are the stages data flows through, left to right, each importing only from those to
its left: space -> predict -> search -> trials -> records -> report -> study -> deploy -> cli
(docs/architecture.svg, drawn from the imports by docs/architecture.py).
"""
