"""WORM-RL: when to stop the Early-Bird search, learned with Deep Q-Learning.

* ``observation``: what the policy sees at a check and its actions (numpy only);
* ``policy``: the trained stable-baselines3 DQN, saved with its observation layout;
* ``record``: one seed's search trajectory, with the stop reward of every check's ticket;
* ``env``: the ``gymnasium.Env`` whose episode is one search (replayed or trained online);
* ``train``: DQN training on recorded trajectories, evaluated on held-out seeds.

``env``, ``train`` and ``policy`` need the optional ``rl`` dependencies
(``pip install 'worm_fast[rl]'``: gymnasium and stable-baselines3).
"""

from worm_fast.rl.observation import (
    ACTIONS,
    CONTINUE,
    STOP,
    TRIGGER,
    CheckFeatures,
    ObservationLayout,
)

__all__ = ["ACTIONS", "CONTINUE", "STOP", "TRIGGER", "CheckFeatures", "ObservationLayout"]
