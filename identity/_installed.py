"""The verifiers a worker process installed, by the task queue they serve.

The settlement worker loads its keys once, when it starts, and installs its verifier
here under its task queue; the workflows it runs look theirs up by their own task
queue (``workflow.info().task_queue``) to check the tokens of approvals, cancels,
affirmations and claims. State at module level on purpose: the worker passes this
package through the workflow sandbox, so every workflow sees the one the worker
installed, and no key ever enters a history. Nothing installed: every token is refused.
(A ``temporalio.worker.Replayer`` runs its workflows on task queue
``replay-<build_id>``: install the verifier under that name to replay signals.)
"""

from __future__ import annotations

from ._tokens import Verifier

__all__ = ["install_verifier", "installed_verifier", "uninstall_verifier"]

# task queue -> verifiers installed for it, the last one in use (several workers of one
# process may serve the same queue, as the fault tests' do)
_INSTALLED: dict[str, list[Verifier]] = {}


def install_verifier(task_queue: str, verifier: Verifier) -> None:
    """Make ``verifier`` the one the workflows on ``task_queue`` use, until uninstalled."""
    _INSTALLED.setdefault(task_queue, []).append(verifier)


def uninstall_verifier(task_queue: str, verifier: Verifier) -> None:
    """Undo one ``install_verifier``; the one installed before it, if any, is used again."""
    installed = _INSTALLED.get(task_queue, [])
    if verifier in installed:
        installed.remove(verifier)
    if not installed:
        _INSTALLED.pop(task_queue, None)


def installed_verifier(task_queue: str) -> Verifier | None:
    """The verifier for ``task_queue``, or None (then every token is refused)."""
    installed = _INSTALLED.get(task_queue)
    return installed[-1] if installed else None
