"""One callback class for both Lightning namespaces: ``lightning.pytorch`` and ``pytorch_lightning``.

Lightning ships the same code under two package names: ``lightning.pytorch`` (the ``lightning``
package) and ``pytorch_lightning`` (the standalone package, what the write-up's origin, scipi1/proT,
imports). Their classes are distinct objects, and a Trainer recognises callbacks by ``isinstance`` on
its own namespace's classes: ``Trainer(callbacks=cb)`` wraps ``cb`` in a list only if it is that
namespace's ``Callback``; checkpoint callbacks are recognised (ordered last, found by
``trainer.checkpoint_callbacks``, required by ``enable_checkpointing``) only if they are that
namespace's ``Checkpoint``. (Source: ``trainer/connectors/callback_connector.py``, ``on_trainer_init``
and ``_reorder_callbacks``, in both packages, Lightning 2.6.)

The classes here inherit from every namespace that is importable, so one ``prot_lib`` callback is an
instance of ``lightning.pytorch.Callback`` AND of ``pytorch_lightning.Callback``. The hooks are duck-typed
on both sides (a hook receives the Trainer and LightningModule of whichever namespace runs it), so the
bodies never test the namespace. ``tests/test_callbacks.py`` runs every callback under both Trainers.

Nothing else in prot_lib is imported here (lowest layer).
"""
from __future__ import annotations

from typing import List, Tuple

import lightning.pytorch as _lpl
from lightning.pytorch.callbacks import Checkpoint as _LplCheckpoint

#: the namespaces present, by import name (``lightning.pytorch`` always: it is a dependency)
NAMESPACES: List[str] = ["lightning.pytorch"]
_callback_bases: List[type] = [_lpl.Callback]
_checkpoint_bases: List[type] = []
try:  # the standalone package; installed alongside ``lightning`` (which depends on it) in most set-ups
    import pytorch_lightning as _ptl
    from pytorch_lightning.callbacks import Checkpoint as _PtlCheckpoint
except ImportError:  # pragma: no cover - lightning>=2.5 requires pytorch-lightning
    _ptl = None
else:
    NAMESPACES.append("pytorch_lightning")
    _callback_bases.append(_ptl.Callback)
    _checkpoint_bases.append(_PtlCheckpoint)

CALLBACK_BASES: Tuple[type, ...] = tuple(_callback_bases)
#: extra bases for a ``lightning.pytorch`` ``ModelCheckpoint`` subclass so the other namespace's Trainer
#: also treats it as a checkpoint callback (``pytorch_lightning.callbacks.Checkpoint`` is a marker class)
CHECKPOINT_MARKERS: Tuple[type, ...] = tuple(_checkpoint_bases)


class Callback(*CALLBACK_BASES):  # type: ignore[misc]
    """``lightning.pytorch.Callback`` that is also a ``pytorch_lightning.Callback`` when that is installed.

    Method resolution follows ``lightning.pytorch.Callback`` (the two define the same no-op hooks).
    """


def is_checkpoint_callback(cb: object) -> bool:
    """True when ``cb`` is a checkpoint callback for some installed namespace."""
    return isinstance(cb, (_LplCheckpoint, *CHECKPOINT_MARKERS))
