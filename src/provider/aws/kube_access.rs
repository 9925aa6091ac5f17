//! Reaching an EKS cluster's Kubernetes API without the `aws` CLI: the
//! endpoint and CA from `DescribeCluster`, and a bearer token in the EKS
//! format — `k8s-aws-v1.` + base64url (no padding) of an STS
//! `GetCallerIdentity` URL presigned (SigV4, query parameters, 60 s) with
//! the header `x-k8s-aws-id: <cluster>` signed. This is what
//! `aws eks get-token` and aws-iam-authenticator produce.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::provider::ProviderError;
use crate::resource::{Address, ProviderId};

use super::AwsProvider;

/// How to reach a cluster's API server. The token is secret: `Debug` hides it.
#[derive(Clone)]
pub struct KubeAccess {
    /// `https://...eks.amazonaws.com`
    pub endpoint: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// Bearer token, valid for about 15 minutes (the presigned URL 60 s).
    pub token: String,
}

impl fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeAccess")
            .field("endpoint", &self.endpoint)
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Endpoint, CA and token of the EKS cluster named `cluster` (the AWS name,
/// see [`super::names::eks_cluster`]); `None` while it does not exist or has
/// no endpoint yet (see [`AwsProvider::kube_access`]).
pub async fn eks_kube_access(
    provider: &AwsProvider,
    cluster: &str,
) -> Result<Option<KubeAccess>, ProviderError> {
    provider.kube_access(cluster).await
}

/// The EKS bearer token for `cluster`, signed with `credentials` for `region` at `time`.
pub fn eks_token(
    credentials: &Credentials,
    region: &str,
    cluster: &str,
    time: SystemTime,
) -> Result<String, String> {
    let host = if region.starts_with("cn-") {
        format!("sts.{region}.amazonaws.com.cn")
    } else {
        format!("sts.{region}.amazonaws.com")
    };
    let url = format!("https://{host}/?Action=GetCallerIdentity&Version=2011-06-15");
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(60));
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let headers = [("host", host.as_str()), ("x-k8s-aws-id", cluster)];
    let request = SignableRequest::new(
        "GET",
        url.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| format!("signable request: {e}"))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| format!("signing: {e}"))?
        .into_parts();
    let mut presigned = url.clone();
    for (name, value) in instructions.params() {
        presigned.push('&');
        presigned.push_str(&encode(name));
        presigned.push('=');
        presigned.push_str(&encode(value));
    }
    Ok(format!(
        "k8s-aws-v1.{}",
        URL_SAFE_NO_PAD.encode(presigned.as_bytes())
    ))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AwsProvider {
    /// How to reach the EKS cluster `cluster` (its AWS name). `None` when it
    /// does not exist, or has no endpoint yet (still `CREATING`): a cluster
    /// the same apply is to create holds nothing yet. Other failures are
    /// errors.
    pub async fn kube_access(&self, cluster: &str) -> Result<Option<KubeAccess>, ProviderError> {
        let address = Address::new(format!("eks:{cluster}"));
        let Some(c) = self
            .describe_cluster(cluster)
            .await
            .map_err(|e| e.at(&address))?
        else {
            return Ok(None);
        };
        let endpoint = c
            .endpoint()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        if endpoint.is_empty() {
            return Ok(None);
        }
        let ca_b64 = c
            .certificate_authority()
            .and_then(|x| x.data())
            .unwrap_or_default();
        let ca = STANDARD
            .decode(ca_b64.trim())
            .map_err(|e| ProviderError::Api {
                address: address.clone(),
                message: format!("the cluster's certificate authority data is not base64: {e}"),
            })?;
        let ca_pem = String::from_utf8(ca).map_err(|_| ProviderError::Api {
            address: address.clone(),
            message: "the cluster's certificate authority is not PEM text".to_owned(),
        })?;
        let Some(provider) = self.sdk.credentials_provider() else {
            return Err(ProviderError::Observe {
                provider: ProviderId::Aws,
                message: "no AWS credentials provider".to_owned(),
            });
        };
        let creds = provider
            .provide_credentials()
            .await
            .map_err(|e| ProviderError::Observe {
                provider: ProviderId::Aws,
                message: format!("no usable AWS credentials: {e}"),
            })?;
        let token = eks_token(&creds, &self.region, cluster, SystemTime::now())
            .map_err(|message| ProviderError::Api { address, message })?;
        Ok(Some(KubeAccess {
            endpoint,
            ca_pem,
            token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        )
    }

    #[test]
    fn token_has_the_eks_shape() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = eks_token(&creds(), "us-east-1", "platform-dev-main", time).expect("token");
        let body = token.strip_prefix("k8s-aws-v1.").expect("prefix");
        assert!(!body.contains('='), "no padding");
        assert!(
            !body.contains('+') && !body.contains('/'),
            "url-safe alphabet"
        );
        let url =
            String::from_utf8(URL_SAFE_NO_PAD.decode(body).expect("base64url")).expect("utf8");
        assert!(
            url.starts_with(
                "https://sts.us-east-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15&"
            ),
            "{url}"
        );
        assert!(url.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256"), "{url}");
        assert!(
            url.contains(
                "X-Amz-Credential=AKIDEXAMPLE%2F20231114%2Fus-east-1%2Fsts%2Faws4_request"
            ),
            "{url}"
        );
        assert!(url.contains("X-Amz-Date=20231114T221320Z"), "{url}");
        assert!(url.contains("X-Amz-Expires=60"), "{url}");
        assert!(
            url.contains("X-Amz-SignedHeaders=host%3Bx-k8s-aws-id"),
            "{url}"
        );
        let sig = url.split("X-Amz-Signature=").nth(1).expect("signature");
        assert_eq!(sig.len(), 64);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
        // Deterministic for the same inputs; the cluster name is part of the signature.
        assert_eq!(
            token,
            eks_token(&creds(), "us-east-1", "platform-dev-main", time).expect("token")
        );
        assert_ne!(
            token,
            eks_token(&creds(), "us-east-1", "other", time).expect("token")
        );
    }

    #[test]
    fn session_token_is_included() {
        let c = Credentials::new("AKID", "secret", Some("SESSION/TOKEN".into()), None, "test");
        let token = eks_token(&c, "eu-west-1", "c", SystemTime::now()).expect("token");
        let url = String::from_utf8(
            URL_SAFE_NO_PAD
                .decode(&token["k8s-aws-v1.".len()..])
                .expect("b64"),
        )
        .expect("utf8");
        assert!(
            url.contains("X-Amz-Security-Token=SESSION%2FTOKEN"),
            "{url}"
        );
        assert!(
            url.starts_with("https://sts.eu-west-1.amazonaws.com/"),
            "{url}"
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let k = KubeAccess {
            endpoint: "https://x".into(),
            ca_pem: "pem".into(),
            token: "k8s-aws-v1.secret".into(),
        };
        assert!(!format!("{k:?}").contains("secret"));
    }
}
