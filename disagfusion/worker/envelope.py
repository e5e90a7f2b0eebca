"""The checks on a task's envelope, made before its job is looked at: the subject it came on and
its ``Nats-Msg-Id`` header must agree with its body. A disagreement is the publisher's mistake,
and left alone it would do harm: a task whose body names another model would run on the
subject's model, and a task with another message id would escape JetStream's de-duplication
(or be dropped as the duplicate of another job's task). A task on a tenant's subject must name a
job of that tenant: anything else would let one tenant answer, or pre-empt, another's jobs."""

from __future__ import annotations

from nats.aio.msg import Msg

from disagfusion.models.base import SpecError
from disagfusion.protocol import StageTask, parse_work_subject, subject_tenant, task_msg_id, tenant_of

MSG_ID_HEADER = "Nats-Msg-Id"


def check_envelope(subject: str, msg_id: str | None, task: StageTask) -> None:
    """Raise SpecError (field ``stage``, ``model`` or ``Nats-Msg-Id``) if ``task``, delivered on
    ``subject`` with header ``msg_id``, is not the task the subject and header say it is."""
    parsed = parse_work_subject(subject)
    if parsed is not None:
        stage, model = parsed
        if task.stage != stage:
            raise SpecError("stage", f"the task says stage {task.stage!r} but came on {subject}, the subject of stage {stage!r}")
        if task.job.model != model:
            raise SpecError("model", f"the job names model {task.job.model!r} but came on {subject}, the subject of model {model!r}")
    foreign = foreign_job_id(subject, task.job.job_id)
    if foreign is not None:
        raise SpecError("job_id", foreign)
    expected = task_msg_id(task.job.job_id, task.stage, task.replay)
    if msg_id != expected:
        got = f"is {msg_id!r}" if msg_id else "is missing"
        raise SpecError(MSG_ID_HEADER, f"header {MSG_ID_HEADER} {got}; this task's must be {expected!r} "
                                       f"(<job_id>:<stage>), so that a retried publish is stored once")


def foreign_job_id(subject: str, job_id: str) -> str | None:
    """Why a task on ``subject`` may not name (nor be answered as) job ``job_id``: the subject is
    a tenant's and the job id is not in the tenant's namespace. None if it may. Such a task gets
    no result: publishing one under another namespace's job id is what the rule forbids."""
    tenant = subject_tenant(subject)
    if tenant is None or tenant_of(job_id) == tenant:
        return None
    return (f"job id {job_id!r} is not tenant {tenant!r}'s: a task on {subject} must name a job "
            f"'{tenant}.<id>'")


def msg_id_of(msg: Msg) -> str | None:
    """The ``Nats-Msg-Id`` header of a delivered message, if it has one."""
    return (msg.headers or {}).get(MSG_ID_HEADER)
