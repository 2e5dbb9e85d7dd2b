"""AWS plumbing for the EC2 system and the ``ps``/``down`` commands (boto3).

How this works
--------------
:func:`ec2_client` builds an EC2 client from boto3's standard chain (environment,
``AWS_PROFILE``, ~/.aws/credentials and config, SSO, container and instance roles) and
fails at once, with the fix, when no region or no credentials are found. Every other
botocore error is translated once, in :func:`translate` (used by :func:`call`): a
refused operation names the IAM permission it needs, rejected credentials say how to
refresh them, an unreachable endpoint is a :class:`NetworkError`; the original error is
kept as ``__cause__``.

Everything bigmrun creates carries tags of the ``bigmrun:`` family (:data:`TAG_SESSION`,
:data:`TAG_USER`...), so :func:`list_instances` and :func:`down` find leftovers of any
session, even of a driver that was killed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import BigmrunError, ConfigError, NetworkError, StartError

TAG_SESSION = "bigmrun:session"
TAG_USER = "bigmrun:user"
TAG_PROGRAM = "bigmrun:program"
TAG_MACHINE = "bigmrun:machine"
TAG_DRIVER_HOST = "bigmrun:driver-host"
#: Names of the per-session key pair and security group: ``bigmrun-<session>``.
RESOURCE_PREFIX = "bigmrun-"

NO_CREDENTIALS = (
    "no AWS credentials found. Run `aws configure` (or `aws sso login`), set AWS_PROFILE "
    "to a profile in ~/.aws/config or ~/.aws/credentials, or set AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)")
NO_REGION = (
    "no AWS region: pass --region (BIGMRUN_EC2_REGION), set AWS_REGION or "
    "AWS_DEFAULT_REGION, or set `region` in ~/.aws/config (`aws configure`)")
#: Error codes that mean "not allowed": the message names the IAM permission.
DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "Forbidden"}
#: Error codes that mean the credentials themselves were refused.
BAD_CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch",
                   "UnrecognizedClientException", "ExpiredToken", "ExpiredTokenException",
                   "RequestExpired", "InvalidToken"}
#: Error codes that mean "no capacity right now": spot falls back to on-demand on these.
CAPACITY = {"InsufficientInstanceCapacity", "InsufficientHostCapacity",
            "InsufficientCapacityOnHost", "InsufficientReservedInstanceCapacity",
            "UnfulfillableCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded"}
#: Error code prefixes that mean bad input (an unknown AMI, subnet, key pair, group...).
BAD_INPUT = ("InvalidAMIID", "InvalidKeyPair", "InvalidSubnet", "InvalidGroup.NotFound",
             "InvalidGroupId", "InvalidVpc", "InvalidParameter", "InvalidInstanceType",
             "InvalidIamInstanceProfile", "InvalidBlockDeviceMapping", "VPCIdNotSpecified",
             "MissingParameter", "Unsupported")
# botocore says where it found credentials at INFO, on every run; the user's log is theirs.
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
#: Extra permissions an operation may need besides its own.
_ALSO_NEEDS = {"RunInstances": " (with --instance-profile also iam:PassRole; tagging at "
                               "launch also needs ec2:CreateTags)"}


def ec2_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """An EC2 client from boto3's standard credential chain and region.

    Raises ConfigError (naming the fix) when no region or no credentials are found.
    """
    import boto3
    import botocore.config
    import botocore.exceptions as bce

    try:
        session = boto3.session.Session(region_name=region or None)
    except bce.ProfileNotFound as e:
        raise ConfigError(f"{e}: check AWS_PROFILE and ~/.aws/config") from e
    if not session.region_name:
        raise ConfigError(NO_REGION) from bce.NoRegionError()
    try:
        credentials = session.get_credentials()
    except bce.BotoCoreError as e:
        raise ConfigError(f"cannot load AWS credentials ({e}). {NO_CREDENTIALS}") from e
    if credentials is None:
        raise ConfigError(NO_CREDENTIALS) from bce.NoCredentialsError()
    config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 6},
                                    user_agent_extra="bigmrun")
    return session.client("ec2", endpoint_url=endpoint_url or None, config=config)


def error_code(e: BaseException | None) -> str:
    """The AWS error code of a botocore ClientError ("" for anything else)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def translate(op: str, e: Exception, what: str = "") -> BigmrunError:
    """The bigmrun error for botocore error ``e`` from EC2 operation ``op``."""
    import botocore.exceptions as bce

    action = f"ec2:{op}"
    where = f" ({what})" if what else ""
    if isinstance(e, bce.NoCredentialsError | bce.PartialCredentialsError
                  | bce.CredentialRetrievalError):
        return ConfigError(f"{NO_CREDENTIALS} [{e}]")
    if isinstance(e, bce.NoRegionError):
        return ConfigError(NO_REGION)
    if isinstance(e, bce.ClientError):
        code = error_code(e)
        message = str(e.response.get("Error", {}).get("Message", "")) or str(e)
        if code in DENIED:
            hint = (" (decode its details with `aws sts decode-authorization-message "
                    "--encoded-message ...`)" if "Encoded authorization" in message else "")
            return ConfigError(
                f"AWS refused {action}{where}: your identity needs the IAM permission "
                f"{action}{_ALSO_NEEDS.get(op, '')}. See the README's list of the "
                f"permissions bigmrun's EC2 system needs. AWS said: {message}{hint}")
        if code in BAD_CREDENTIALS:
            return ConfigError(
                f"AWS rejected the credentials in {action}{where} ({code}: {message}). "
                f"Refresh them (`aws sso login`, `aws configure`) or check AWS_PROFILE")
        if code == "OptInRequired":
            return ConfigError(f"{action}{where}: {message} (opt in to EC2 or this region "
                               f"in the AWS console)")
        if code.startswith(BAD_INPUT):
            return ConfigError(f"EC2 {op}{where} failed: {code}: {message}")
        err = StartError(f"EC2 {op}{where} failed: {code}: {message}")
        err.temporary = code in CAPACITY or code in ("RequestLimitExceeded", "Throttling")
        return err
    if isinstance(e, bce.EndpointConnectionError | bce.ConnectionClosedError
                  | bce.ConnectTimeoutError | bce.ReadTimeoutError):
        return NetworkError(f"cannot reach EC2 for {action}{where}: {e}")
    if isinstance(e, bce.ParamValidationError):
        return ConfigError(f"bad parameters for {action}{where}: {e}")
    return StartError(f"EC2 {op}{where} failed: {type(e).__name__}: {e}")


def call(client: Any, op: str, what: str = "", **params: Any) -> Any:
    """``client.<op>(**params)`` with botocore errors translated (``what`` says why)."""
    import botocore.exceptions as bce
    from botocore import xform_name

    try:
        return getattr(client, xform_name(op))(**params)
    except (bce.BotoCoreError, bce.ClientError) as e:
        raise translate(op, e, what) from e


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v[:256]} for k, v in tags.items()]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or []}


def _session_filter(session: str | None) -> list[dict[str, Any]]:
    if session:
        return [{"Name": f"tag:{TAG_SESSION}", "Values": [session]}]
    return [{"Name": "tag-key", "Values": [TAG_SESSION]}]


def list_instances(client: Any, session: str | None = None,
                   include_terminated: bool = False) -> list[dict[str, Any]]:
    """Instances bigmrun tagged (of one session if given), oldest first, as flat dicts."""
    filters = _session_filter(session)
    if not include_terminated:
        filters.append({"Name": "instance-state-name",
                        "Values": ["pending", "running", "stopping", "stopped",
                                   "shutting-down"]})
    out = []
    paginator = client.get_paginator("describe_instances")
    try:
        pages = list(paginator.paginate(Filters=filters))
    except Exception as e:
        raise _translated("DescribeInstances", e) from e
    for page in pages:
        for reservation in page.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                tags = tags_of(inst)
                launched = inst.get("LaunchTime")
                out.append({
                    "session": tags.get(TAG_SESSION, ""),
                    "instance": inst["InstanceId"],
                    "state": inst.get("State", {}).get("Name", "?"),
                    "type": inst.get("InstanceType", ""),
                    "market": inst.get("InstanceLifecycle") or "on-demand",
                    "public_ip": inst.get("PublicIpAddress") or "",
                    "private_ip": inst.get("PrivateIpAddress") or "",
                    "launched": launched.isoformat() if hasattr(launched, "isoformat")
                    else str(launched or ""),
                    "machine": tags.get(TAG_MACHINE, ""),
                    "program": tags.get(TAG_PROGRAM, ""),
                    "user": tags.get(TAG_USER, ""),
                })
    out.sort(key=lambda r: (r["launched"], r["session"], r["machine"]))
    return out


def _translated(op: str, e: Exception) -> BigmrunError:
    if isinstance(e, BigmrunError):
        return e
    try:
        import botocore.exceptions as bce
    except ImportError:  # pragma: no cover
        return StartError(str(e))
    if isinstance(e, bce.BotoCoreError | bce.ClientError):
        return translate(op, e)
    return StartError(f"EC2 {op} failed: {type(e).__name__}: {e}")


def session_key_pairs(client: Any, session: str | None = None) -> list[dict[str, Any]]:
    """Key pairs bigmrun made for sessions (never the ones users named)."""
    pairs = call(client, "DescribeKeyPairs", Filters=_session_filter(session))["KeyPairs"]
    return [p for p in pairs if p.get("KeyName", "").startswith(RESOURCE_PREFIX)]


def session_security_groups(client: Any, session: str | None = None) -> list[dict[str, Any]]:
    """Security groups bigmrun made for sessions (never the ones users named)."""
    groups = call(client, "DescribeSecurityGroups",
                  Filters=_session_filter(session))["SecurityGroups"]
    return [g for g in groups if g.get("GroupName", "").startswith(RESOURCE_PREFIX)]


def terminate(client: Any, ids: list[str], what: str = "") -> None:
    """Terminate instances (in batches); already-gone instances are not an error."""
    for i in range(0, len(ids), 500):
        batch = ids[i:i + 500]
        try:
            call(client, "TerminateInstances", what, InstanceIds=batch)
        except BigmrunError as e:
            if error_code(e.__cause__) != "InvalidInstanceID.NotFound":
                raise
            if len(batch) > 1:  # one of them is gone: terminate the others one by one
                for one in batch:
                    terminate(client, [one], what)


def wait_terminated(client: Any, ids: list[str], timeout: float,
                    sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Wait (bounded) until none of ``ids`` is still shutting down; return those left."""
    deadline = time.monotonic() + timeout
    left = list(ids)
    while left:
        try:
            resp = call(client, "DescribeInstances", Filters=[
                {"Name": "instance-id", "Values": left},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping",
                                                          "stopped", "shutting-down"]}])
        except BigmrunError:
            return left
        left = [inst["InstanceId"] for r in resp.get("Reservations", [])
                for inst in r.get("Instances", [])]
        if not left or time.monotonic() > deadline:
            break
        sleep(min(3.0, max(0.1, deadline - time.monotonic())))
    return left


def delete_security_group(client: Any, group_id: str, timeout: float,
                          sleep: Callable[[float], None] = time.sleep) -> None:
    """Delete a security group, retrying (bounded) while terminating instances hold it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(client, "DeleteSecurityGroup", GroupId=group_id)
            return
        except BigmrunError as e:
            code = error_code(e.__cause__)
            if code == "InvalidGroup.NotFound":
                return
            if code != "DependencyViolation" or time.monotonic() > deadline:
                raise
        sleep(3.0)


def down(client: Any, session: str | None = None, *, confirm: Callable[[str], bool],
         echo: Callable[[str], None], wait_timeout: float = 300.0) -> int:
    """Terminate every instance bigmrun tagged (of ``session`` if given) and delete the
    per-session key pairs and security groups. Returns how many things it removed."""
    instances = list_instances(client, session)
    pairs = session_key_pairs(client, session)
    groups = session_security_groups(client, session)
    if not (instances or pairs or groups):
        echo("nothing to clean up" + (f" for session {session}" if session else ""))
        return 0
    plan = []
    if instances:
        plan.append(f"terminate {len(instances)} instance(s): "
                    + ", ".join(f"{r['instance']} (session {r['session']}, {r['machine'] or '?'})"
                                for r in instances))
    if pairs:
        plan.append("delete key pair(s): " + ", ".join(p["KeyName"] for p in pairs))
    if groups:
        plan.append("delete security group(s): "
                    + ", ".join(f"{g['GroupId']} ({g['GroupName']})" for g in groups))
    for line in plan:
        echo(line)
    if not confirm("Go ahead?"):
        echo("nothing done")
        return 0
    done = 0
    ids = [r["instance"] for r in instances]
    if ids:
        terminate(client, ids, "bigmrun down")
        for r in instances:
            echo(f"terminated {r['instance']} (session {r['session']}, machine "
                 f"{r['machine'] or '?'}, was {r['state']})")
            done += 1
    for p in pairs:
        call(client, "DeleteKeyPair", KeyName=p["KeyName"])
        echo(f"deleted key pair {p['KeyName']}")
        done += 1
    if groups:
        if ids:
            left = wait_terminated(client, ids, wait_timeout)
            if left:
                echo(f"still shutting down after {wait_timeout:g}s: {', '.join(left)}")
        for g in groups:
            try:
                delete_security_group(client, g["GroupId"], 30.0)
            except BigmrunError as e:
                echo(f"could not delete security group {g['GroupId']}: {e} "
                     f"(run `bigmrun down` again once its instances are gone)")
                continue
            echo(f"deleted security group {g['GroupId']} ({g['GroupName']})")
            done += 1
    return done


def say(message: str) -> None:
    """A notice on the driver's stderr (spot fallbacks, cleanup problems)."""
    try:
        print(f"bigmrun ec2: {message}", file=sys.stderr, flush=True)
    except Exception:
        pass
