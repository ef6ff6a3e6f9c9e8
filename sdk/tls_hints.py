"""What to do about a TLS certificate that does not verify, for the agent's and the fleet's errors.

Python 3.13 and newer verify certificates strictly (``ssl.VERIFY_X509_STRICT``, RFC 5280):
certificates that OpenSSL's own tools such as ``mosquitto_sub`` accept can be refused for a
missing extension. Saying so saves an operator from hunting for a wrong CA file.
"""

from __future__ import annotations

# OpenSSL's messages for the checks that only strict mode makes
_STRICT_ONLY = ("key identifier", "basic constraints", "key usage", "extension")


def is_strict_x509_failure(verify_message: str) -> bool:
    """Whether OpenSSL's verify message names a check only strict verification makes."""
    text = verify_message.lower()
    return any(marker in text for marker in _STRICT_ONLY)


def verify_failure_hint(verify_message: str, ca_setting: str) -> str:
    """The next step for a certificate that failed verification with ``verify_message``;
    ``ca_setting`` names where the CA file is configured."""
    if is_strict_x509_failure(verify_message):
        return ("Python 3.13+ verifies certificates strictly (RFC 5280): reissue the broker's "
                "certificate, or the CA, with the extensions listed under Certificates in "
                "docs/operator-guide.md (CA: basicConstraints critical CA:TRUE, keyUsage "
                "keyCertSign, subjectKeyIdentifier; broker: basicConstraints CA:FALSE, "
                "subjectKeyIdentifier, authorityKeyIdentifier)")
    return (f"point {ca_setting} at the CA that signed it, and use a host name or IP address "
            "the certificate names")
