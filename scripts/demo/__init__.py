"""The synthetic demo: :mod:`scripts.demo.cohort` draws the cohort, :mod:`scripts.demo.run` runs every stage on it
(``make demo`` = ``python -m scripts.demo``). Nothing else in the bundle imports this package."""
