"""URL checks of the DICOMweb client: scheme validation and the SSRF guard."""

from __future__ import annotations

import pytest

from dicom_node.dicomweb import (
    BasicAuth,
    BearerAuth,
    DicomWebClient,
    url_allowed,
    validate_base_url,
)
from dicom_node.errors import InvalidInput

BASES = ["http://pacs.example.org:8042/dicom-web", "https://cloud.example.com/v1/dicomWeb/"]


@pytest.mark.parametrize("url", [
    "http://pacs.example.org:8042/dicom-web",
    "http://pacs.example.org:8042/dicom-web/",
    "http://pacs.example.org:8042/dicom-web/studies/1.2.3",
    "http://PACS.Example.ORG:8042/dicom-web/studies",
    "http://pacs.example.org.:8042/dicom-web/studies",
    "http://pacs.example.org:8042//dicom-web//studies",
    "HTTP://pacs.example.org:8042/dicom-web",
    "https://cloud.example.com/v1/dicomWeb/studies?limit=3",
    "https://cloud.example.com:443/v1/dicomWeb",
    "https://cloud.example.com/v1/%64icomWeb/studies",
])
def test_urls_under_a_base_are_allowed(url: str) -> None:
    assert url_allowed(url, BASES, allow_any=False)


@pytest.mark.parametrize("url", [
    # other hosts, ports, schemes, path prefixes
    "http://evil.example.org:8042/dicom-web",
    "http://pacs.example.org:8043/dicom-web",
    "http://pacs.example.org/dicom-web",
    "https://pacs.example.org:8042/dicom-web",
    "http://cloud.example.com/v1/dicomWeb",
    "https://cloud.example.com:8443/v1/dicomWeb",
    "http://pacs.example.org:8042/dicom-web-evil",
    "http://pacs.example.org:8042/dicom",
    "http://pacs.example.org:8042/",
    "https://cloud.example.com/v1/dicomweb",
    # userinfo tricks
    "http://pacs.example.org:8042@evil.example.org/dicom-web",
    "http://pacs.example.org@evil.example.org:8042/dicom-web",
    "http://user:pw@pacs.example.org:8042/dicom-web",
    "http://evil.example.org\\@pacs.example.org:8042/dicom-web",
    # dot segments, plain and encoded; encoded slashes
    "http://pacs.example.org:8042/dicom-web/../admin",
    "http://pacs.example.org:8042/dicom-web/%2e%2e/admin",
    "http://pacs.example.org:8042/dicom-web/%2E%2E/admin",
    "http://pacs.example.org:8042/dicom-web/./studies",
    "http://pacs.example.org:8042/dicom-web%2f..%2fadmin",
    # other schemes and junk
    "ftp://pacs.example.org:8042/dicom-web",
    "file:///etc/passwd",
    "gopher://pacs.example.org:8042/dicom-web",
    "javascript:alert(1)",
    "//pacs.example.org:8042/dicom-web",
    "pacs.example.org:8042/dicom-web",
    "",
    " http://pacs.example.org:8042/dicom-web",
    "http://pacs.example.org:8042/dicom-web\r\nX: y",
    "http://pacs.example.org:99999/dicom-web",
    "http://pacs.example.org:0/dicom-web",
    "http://%70acs.example.org:8042/dicom-web",
    "http:///dicom-web",
])
def test_other_urls_are_refused(url: str) -> None:
    assert not url_allowed(url, BASES, allow_any=False)


def test_allow_any_still_refuses_tricks() -> None:
    assert url_allowed("https://anything.example.net/x", [], allow_any=True)
    assert url_allowed("http://10.0.0.1:8080/dicom-web", [], allow_any=True)
    for bad in ("ftp://x/y", "http://a@b/c", "http://b/c/../d", "file:///etc/passwd", ""):
        assert not url_allowed(bad, [], allow_any=True)


def test_no_bases_allows_nothing() -> None:
    assert not url_allowed("http://pacs.example.org:8042/dicom-web", [], allow_any=False)


def test_bad_base_entries_are_ignored() -> None:
    assert not url_allowed("http://good/x", ["ftp://good/x", "not a url"], allow_any=False)
    assert url_allowed("http://good/x/y", ["ftp://good/x", "http://good/x"], allow_any=False)


def test_ipv6_hosts() -> None:
    assert url_allowed("http://[::1]:8042/dicom-web/studies", ["http://[::1]:8042/dicom-web"])
    assert not url_allowed("http://[::2]:8042/dicom-web", ["http://[::1]:8042/dicom-web"])


@pytest.mark.parametrize("url", [
    "ftp://pacs/dicom-web", "file:///tmp/x", "javascript:alert(1)", "gopher://x/",
    "", "   ", "pacs:8042/dicom-web", "http://", "http://u:p@pacs/dicom-web",
    "http://pacs:notaport/dicom-web", "http://pacs/dicom-web?x=1",
])
def test_client_refuses_bad_base_urls(url: str) -> None:
    with pytest.raises(InvalidInput):
        DicomWebClient(url)
    with pytest.raises(InvalidInput):
        validate_base_url(url)


def test_client_accepts_http_and_https() -> None:
    assert validate_base_url("http://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"
    for url in ("http://pacs:8042/dicom-web", "https://pacs.example.org/dicomweb"):
        with DicomWebClient(url, BasicAuth("u", "p")) as client:
            assert client.base_url == url


def test_credentials_do_not_show_in_reprs() -> None:
    assert "hunter2" not in repr(BasicAuth("u", "hunter2"))
    assert "tok" not in repr(BearerAuth("tok"))
    with DicomWebClient("https://pacs/dicom-web", BearerAuth("tok")) as client:
        assert "tok" not in repr(client)


def test_client_refuses_bad_timeouts() -> None:
    with pytest.raises(InvalidInput):
        DicomWebClient("http://pacs/dicom-web", read_timeout_s=0)
