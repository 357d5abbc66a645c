"""How long an exchange with a misbehaving peer lasts, against its total deadline.

    python -m bench.peer_deadlines [--deadline 2 5]

Each peer (tests/peers.py) misbehaves on purpose: an HTTP server (FHIR, STOW-RS) and an
MLLP listener that trickle their answer one byte every 0.5 s or never answer, a PACS that
holds a C-STORE, a Q/R SCP that answers C-FIND, C-MOVE and C-GET with "pending" forever.
Without a total deadline the trickling answers alone take about 50 s (HTTP) and 45 s
(MLLP); the pending ones never end. One JSON line per peer and deadline: the seconds the
exchange took and its reason.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cxrbatch.config import Destination
from cxrbatch.errors import CxrBatchError

MESSAGE = "MSH|^~\\&|CXRBATCH||RIS||20261203120000||ORU^R01^ORU_R01|C1|P|2.5\r"


def _timed(run: Callable[[], object]) -> tuple[float, str]:
    started = time.monotonic()
    try:
        run()
        reason = "ended without an error"
    except CxrBatchError as exc:
        reason = str(exc)
    return time.monotonic() - started, reason


def _transports(deadline: float, root: Path) -> list[dict[str, object]]:
    import pydicom
    from pynetdicom import AE, evt

    from cxrbatch.send.transports import fhir_transaction, mllp, send
    from cxrbatch_training.synthetic import make_phantom, save, to_dataset
    from tests.peers import HostileHttp, HostileMllp
    from tests.test_scp import _free_port

    obj = save(to_dataset(make_phantom(7, (64, 64)), "77/0"), root / "obj.dcm")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {}}]}
    rows: list[dict[str, object]] = []
    for mode in ("trickle", "silent"):
        http = HostileHttp(_free_port(), mode)
        fhir = Destination(name="ehr", transport="fhir", url=http.url, timeout_seconds=deadline)
        stow = fhir.model_copy(update={"name": "pacs", "transport": "stow-rs"})
        for name, run in (
            ("FHIR", lambda fhir=fhir: fhir_transaction(fhir, bundle)),
            ("STOW-RS", lambda stow=stow: send(stow, [obj], "CXRBATCH")),
        ):
            seconds, reason = _timed(run)
            rows.append({"peer": f"{name} {mode}", "seconds": round(seconds, 2), "reason": reason})
        http.stop()
        listener = HostileMllp(_free_port(), mode)
        ris = Destination(
            name="ris", transport="hl7-mllp", host="127.0.0.1", port=listener.port,
            timeout_seconds=deadline,
        )  # fmt: skip
        seconds, reason = _timed(lambda ris=ris: mllp(ris, MESSAGE, "C1"))
        rows.append({"peer": f"MLLP {mode}", "seconds": round(seconds, 2), "reason": reason})
        listener.stop()

    def hold(event: evt.Event) -> int:
        time.sleep(3600)
        return 0

    scp = AE(ae_title="SLOWPACS")
    scp.add_supported_context(pydicom.dcmread(obj).SOPClassUID)
    port = _free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, hold)]
    )
    pacs = Destination(
        name="pacs", ae_title="SLOWPACS", host="127.0.0.1", port=port, timeout_seconds=deadline
    )
    seconds, reason = _timed(lambda: send(pacs, [obj], "CXRBATCH"))
    rows.append({"peer": "C-STORE held", "seconds": round(seconds, 2), "reason": reason})
    server.shutdown()
    return rows


def _pulls(deadline: float, root: Path) -> list[dict[str, object]]:
    from typer.testing import CliRunner

    from cxrbatch.cli import app
    from tests.peers import HostileQueryRetrieve
    from tests.test_pull_hostile import _archive
    from tests.test_scp import _free_port

    rows: list[dict[str, object]] = []
    for mode, retrieve in (("find-forever", "c-move"), ("move-forever", "c-move"),
                           ("move-forever", "c-get")):  # fmt: skip
        archive, _ = _archive()
        receiver = _free_port()
        pacs = HostileQueryRetrieve(
            _free_port(), archive[:1], {mode}, moves={"CXRBATCH": ("127.0.0.1", receiver)}
        )
        site = root / f"{mode}-{retrieve}"
        site.mkdir()
        config = site / "site.toml"
        config.write_text(
            f'[segmentation]\ndevice = "cpu"\n[dicom]\nport = {receiver}\n'
            f'[[pull.sources]]\nname = "hostile"\nae_title = "HOSTILE"\n'
            f'host = "127.0.0.1"\nport = {pacs.port}\nretrieve = "{retrieve}"\n'
            f"timeout_seconds = {deadline}\n"
        )
        started = time.monotonic()
        result = CliRunner().invoke(
            app, ["pull", "--out", str(site / "out"), "--config", str(config),
                  "--date", "20260101"],
        )  # fmt: skip
        seconds = time.monotonic() - started
        pacs.stop()
        last = [line for line in result.output.splitlines() if "deadline" in line]
        what = "C-FIND" if mode == "find-forever" else retrieve.upper()
        rows.append({
            "peer": f"{what} pending forever", "seconds": round(seconds, 2),
            "exit": result.exit_code, "reason": " ".join(last[-1:]),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, nargs="+", default=[2.0, 5.0])
    args = parser.parse_args()
    for deadline in args.deadline:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            for row in _transports(deadline, root) + _pulls(deadline, root):
                print(json.dumps({"deadline_s": deadline, **row}), flush=True)


if __name__ == "__main__":
    main()
