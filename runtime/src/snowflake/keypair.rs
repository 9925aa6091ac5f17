//! Key-pair authentication: a JWT signed with the user's RSA private key.
//!
//! Snowflake's key-pair login sends `AUTHENTICATOR = SNOWFLAKE_JWT` and a
//! token signed RS256 whose issuer names the account, the user and the
//! SHA-256 fingerprint of the public key registered for the user
//! (`RSA_PUBLIC_KEY_FP`):
//!
//! ```text
//! {"iss": "ACCOUNT.USER.SHA256:<base64 sha256 of the public key's DER>",
//!  "sub": "ACCOUNT.USER", "iat": now, "exp": now + 60}
//! ```
//!
//! The key is a PEM: unencrypted PKCS#8 (`BEGIN PRIVATE KEY`, what
//! `openssl genrsa | openssl pkcs8 -topk8 -nocrypt` writes) or PKCS#1
//! (`BEGIN RSA PRIVATE KEY`). Encrypted keys are refused with a hint.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};

/// How long a login JWT is valid.
const JWT_LIFETIME_SECS: u64 = 60;

/// A parsed private key; `Debug` shows only the public fingerprint.
pub struct KeyPair {
    key: RsaKeyPair,
    fingerprint: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", self.fingerprint)
    }
}

impl KeyPair {
    /// Parses a PEM private key. Errors never hold key material.
    pub fn from_pem(pem: &str) -> Result<KeyPair, String> {
        let (label, der) = pem_body(pem)?;
        let key = match label.as_str() {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            "ENCRYPTED PRIVATE KEY" => {
                return Err(
                    "encrypted private keys are not supported; store it decrypted \
                            (openssl pkcs8 -in key.p8 -out key.pem -nocrypt)"
                        .into(),
                );
            }
            other => {
                return Err(format!(
                    "expected an RSA private key, found a PEM `{other}`"
                ));
            }
        }
        .map_err(|e| format!("not a usable RSA private key ({e})"))?;
        let fingerprint = format!(
            "SHA256:{}",
            STANDARD.encode(ring::digest::digest(
                &ring::digest::SHA256,
                &spki_der(key.public_key().as_ref())
            ))
        );
        Ok(KeyPair { key, fingerprint })
    }

    /// `SHA256:<base64>`: the public key fingerprint Snowflake stores.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A login JWT for `account` and `user`, issued at `now` (Unix seconds).
    pub fn jwt(&self, account: &str, user: &str, now: u64) -> Result<String, String> {
        let account = jwt_account(account);
        let user = user.to_uppercase();
        let header = r#"{"alg":"RS256","typ":"JWT"}"#;
        let claims = serde_json::json!({
            "iss": format!("{account}.{user}.{}", self.fingerprint),
            "sub": format!("{account}.{user}"),
            "iat": now,
            "exp": now + JWT_LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the login token failed".to_string())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// The account part of a JWT issuer: upper case, without a region or cloud
/// suffix (`xy12345.eu-west-1` → `XY12345`); an `org-account` name keeps its
/// dash. Snowflake's connectors do the same.
fn jwt_account(account: &str) -> String {
    let base = if account.contains(".global") {
        account.split('-').next().unwrap_or(account)
    } else {
        account.split('.').next().unwrap_or(account)
    };
    base.to_uppercase()
}

/// Label and decoded body of the first PEM block.
fn pem_body(pem: &str) -> Result<(String, Vec<u8>), String> {
    let begin = pem
        .find("-----BEGIN ")
        .ok_or_else(|| "not a PEM private key (no BEGIN line)".to_string())?;
    let rest = &pem[begin + 11..];
    let label_end = rest
        .find("-----")
        .ok_or_else(|| "malformed PEM BEGIN line".to_string())?;
    let label = rest[..label_end].to_string();
    let body = &rest[label_end + 5..];
    let end = body
        .find("-----END ")
        .ok_or_else(|| "malformed PEM (no END line)".to_string())?;
    let b64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = STANDARD
        .decode(b64)
        .map_err(|_| "malformed PEM (bad base64)".to_string())?;
    Ok((label, der))
}

/// Wraps a PKCS#1 `RSAPublicKey` into a `SubjectPublicKeyInfo` (DER): what
/// `openssl rsa -pubout -outform DER` writes and Snowflake fingerprints.
fn spki_der(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    inner.extend(der_tlv(0x03, &bit_string));
    der_tlv(0x30, &inner)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names_for_the_issuer() {
        assert_eq!(jwt_account("xy12345"), "XY12345");
        assert_eq!(jwt_account("xy12345.eu-west-1.aws"), "XY12345");
        assert_eq!(jwt_account("myorg-analytics"), "MYORG-ANALYTICS");
        assert_eq!(jwt_account("xy12345-acme.global"), "XY12345");
    }

    #[test]
    fn key_errors_name_no_key_material() {
        let e = KeyPair::from_pem("hello").unwrap_err();
        assert!(e.contains("no BEGIN line"), "{e}");
        let e = KeyPair::from_pem(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(
            e.contains("encrypted private keys are not supported"),
            "{e}"
        );
        let e =
            KeyPair::from_pem("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
                .unwrap_err();
        assert!(!e.contains("c2VjcmV0") && !e.contains("secret"), "{e}");
    }

    /// A throwaway key made for these tests (`openssl genrsa 2048 | openssl pkcs8 -topk8 -nocrypt`).
    const KEY_PKCS8: &str = include_str!("../../tests/data/snowflake/test_key.p8");
    /// The same key as PKCS#1 (`openssl rsa -traditional`).
    const KEY_PKCS1: &str = include_str!("../../tests/data/snowflake/test_key_pkcs1.pem");
    /// `openssl rsa -in test_key.p8 -pubout -outform DER | openssl dgst -sha256 -binary | base64`
    const OPENSSL_FINGERPRINT: &str = "SHA256:x9DW64fCRgEl1OYjPAskIK5ujxgBeyy/M9VmUNtOKKo=";

    #[test]
    fn fingerprint_matches_openssl_for_both_pem_forms() {
        for pem in [KEY_PKCS8, KEY_PKCS1] {
            let key = KeyPair::from_pem(pem).expect("parses");
            assert_eq!(key.fingerprint(), OPENSSL_FINGERPRINT);
            assert_eq!(
                format!("{key:?}"),
                format!("KeyPair({OPENSSL_FINGERPRINT})")
            );
        }
    }

    #[test]
    fn jwt_is_well_formed_and_verifies_with_the_public_key() {
        let key = KeyPair::from_pem(KEY_PKCS8).expect("parses");
        let jwt = key
            .jwt("xy12345.eu-west-1", "mesh_reader", 1_700_000_000)
            .expect("signs");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": format!("XY12345.MESH_READER.{OPENSSL_FINGERPRINT}"),
                "sub": "XY12345.MESH_READER",
                "iat": 1_700_000_000u64,
                "exp": 1_700_000_060u64,
            })
        );
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.key.public_key().as_ref().to_vec(),
        );
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature verifies");
    }

    #[test]
    fn long_der_lengths() {
        assert_eq!(der_tlv(0x04, &[7; 3]), [0x04, 3, 7, 7, 7]);
        let long = der_tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }
}
