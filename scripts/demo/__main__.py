"""``python -m scripts.demo`` (what ``make demo`` runs): the stages of :mod:`scripts.demo.run`."""

import fire

from scripts.demo.run import main

fire.Fire(main)
