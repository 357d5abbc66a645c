"""The read-only JSON API (/api/v1): the worklist's filters and keyset pages, one study in
full, answers that match the OpenAPI schema the app serves, and the pages' rules
(authentication, audit, no patient data for an anonymous request, notices)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from cxrbatch.config import WebUser
from cxrbatch.site import Site
from cxrbatch.web import deps
from cxrbatch.web.app import create_app
from cxrbatch.web.auth import User, hash_password
from tests.test_web import PASSWORD, SECRET_NAME, _audit, _client, _uids, processed

__all__ = ["processed"]  # the module-scoped site of tests/test_web.py, used here too


def _valid(client: TestClient, model: str, answer: dict[str, Any]) -> None:
    """`answer` as the served OpenAPI schema describes the model (JSON Schema 2020-12)."""
    spec = client.get("/openapi.json").json()
    schema = {"$ref": f"#/components/schemas/{model}", "components": spec["components"]}
    errors = list(Draft202012Validator(schema).iter_errors(answer))
    assert not errors, [e.message for e in errors[:5]]


def test_the_api_pages_the_worklist_and_shows_a_study_as_its_schema_says(
    processed: Site,
) -> None:
    client = _client(processed)
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/studies", "/api/v1/studies/{uid}"} <= set(spec["paths"])

    first = client.get("/api/v1/studies", params={"size": 2})
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    page = first.json()
    _valid(client, "StudyPage", page)
    assert len(page["studies"]) == 2 and page["total"] == 3 and page["next"]
    rest = client.get("/api/v1/studies", params={"size": 2, "after": page["next"]}).json()
    assert len(rest["studies"]) == 1 and rest["next"] is None and rest["previous"]
    listed = [s["study_instance_uid"] for s in page["studies"] + rest["studies"]]
    assert sorted(listed) == sorted(_uids(processed))
    # Anonymous: no patient data; the notices ride along with the scores.
    assert SECRET_NAME not in first.text and "SYN-" not in first.text
    assert all(s["patient_name"] is None and s["accession_number"] is None for s in page["studies"])
    assert "not for diagnostic use" in page["notice"]
    assert page["synthetic_notice"] and all(s["synthetic_model"] for s in page["studies"])

    uid = listed[0]
    detail = client.get(f"/api/v1/studies/{uid}").json()
    _valid(client, "StudyDetail", detail)
    assert detail["study_instance_uid"] == uid and detail["status"] == "processed"
    (image,) = detail["images"]
    roles = {f["role"] for f in image["findings"]}
    assert "classifier" in roles and "screening" in roles
    # A call wherever the bundle has an operating point (this test bundle: Mass only).
    called = [f for f in image["findings"] if f["role"] == "classifier" and f["threshold"]]
    assert called and all(f["positive"] == (f["probability"] >= f["threshold"]) for f in called)
    assert detail["thresholds"] == {f["label"]: f["threshold"] for f in called}
    assert detail["models"] and detail["processed_by"]
    assert {m["sha256"] for m in detail["models"]} and "json" in detail["files"]
    # The links lead where the pages lead, under the same rules: DICOM only signed in.
    assert client.get(detail["files"]["json"]).status_code == 200
    assert client.get(detail["files"]["sr"]).status_code == 403

    for params, status in (
        ({"status": "failed"}, 200),
        ({"status": "bogus"}, 400),
        ({"label": "Cancer"}, 400),
        ({"sort": "bogus"}, 422),
        ({"size": 0}, 422),
        ({"size": 501}, 422),
        ({"after": "not-a-cursor"}, 400),
    ):
        answer = client.get("/api/v1/studies", params=params)
        assert answer.status_code == status, params
    assert client.get("/api/v1/studies", params={"status": "failed"}).json()["studies"] == []
    assert client.get("/api/v1/studies/9.9.9").status_code == 404
    audit = _audit(processed)
    assert ("anonymous", "api_worklist_viewed", None) in audit
    assert ("anonymous", "api_study_viewed", uid) in audit


def test_the_api_asks_for_the_same_sign_in_as_the_pages(processed: Site) -> None:
    users = (
        WebUser(name="reader", password_hash=hash_password(PASSWORD)),
        WebUser(name="Müller", password_hash=hash_password("Passwört")),
    )
    client = _client(processed, users=users)

    def basic(credentials: bytes) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}

    assert client.get("/api/v1/studies").status_code == 401
    assert client.get("/api/v1/studies", headers=basic(b"reader:wrong")).status_code == 401
    assert client.get("/api/v1/studies", headers={"Authorization": "Basic %%%"}).status_code == 401
    signed_in = client.get("/api/v1/studies", headers=basic(f"reader:{PASSWORD}".encode()))
    assert signed_in.status_code == 200
    assert {s["patient_name"] for s in signed_in.json()["studies"]} == {SECRET_NAME}
    # Browsers send Basic credentials in UTF-8 (RFC 7617): a Müller signs in.
    umlaut = basic("Müller:Passwört".encode())
    assert client.get("/api/v1/studies", headers=umlaut).status_code == 200
    assert client.get("/", headers=umlaut).status_code == 200


def test_a_test_can_stand_in_for_the_user(processed: Site) -> None:
    """The routes' dependencies are FastAPI's: a test (or an embedding app) overrides them."""
    app = create_app(processed)
    app.dependency_overrides[deps.user] = lambda: User("override", authenticated=True)
    answer = TestClient(app).get("/api/v1/studies").json()
    assert {s["patient_name"] for s in answer["studies"]} == {SECRET_NAME}
    assert ("override", "api_worklist_viewed", None) in _audit(processed)


@pytest.mark.parametrize("path", ["/api/v1/studies", "/openapi.json"])
def test_the_api_answers_carry_the_security_headers(processed: Site, path: str) -> None:
    answer = _client(processed).get(path)
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
