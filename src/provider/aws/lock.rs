//! The shared lock of an `aws` environment: one item per stack and
//! environment in the DynamoDB table [`TABLE`] of the account, in the
//! environment's region. Everyone applying the stack with that account (a
//! laptop, CI) sees it, unlike the lock file under `.mesh/`, and it exists
//! before any cluster does (a stack of cloud resources only has no Lease).
//!
//! - The table (key `id`, on-demand billing) is created on first use and
//!   kept: every stack of the account shares it, and an empty one costs
//!   nothing.
//! - Taken with a conditional `PutItem` (`attribute_not_exists(id) OR
//!   expires < now`): of two runs racing, DynamoDB lets one win. A lapsed
//!   lock (a killed run's) is taken over, with a warning naming its holder.
//! - Renewed every 20 s (`expires` pushed 60 s ahead) while held, on the
//!   condition that `token` is still ours; a killed run's lock lapses 60 s
//!   after its last renewal.
//! - Released by deleting the item on the same condition, so a lock taken
//!   over meanwhile is left alone; broken by `mesh unlock` unconditionally.
//! - Who holds it is the item's `holder` (pid, host, command, since), for the
//!   refusal message, as in the lock file and the Lease.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};

use super::call::{AwsError, Service};
use super::{AwsProvider, config_error};
use crate::lock::{Holder, format_time, now};
use crate::provider::wait::{Every, Polled, Report, Wait, Waited, poll_until};
use crate::provider::{ProviderError, SharedLock};
use crate::resource::Scope;

/// The lock table of the account (one per region).
pub const TABLE: &str = "mesh-locks";
/// How long a lock lives after its last renewal.
pub const DURATION_SECS: u64 = 60;
const RENEW_EVERY: Duration = Duration::from_secs(20);
/// How long a table just created may take to become ACTIVE.
const TABLE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The item key of a stack and environment.
pub fn item_id(scope: &Scope) -> String {
    format!("{}/{}", scope.stack, scope.env)
}

/// What a lock item says about its holder and its lapse time.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub holder: Option<Holder>,
    /// Unix seconds after which it may be taken over.
    pub expires: Option<u64>,
}

impl Held {
    fn from_item(item: &HashMap<String, AttributeValue>) -> Held {
        let holder = match item.get("holder") {
            Some(AttributeValue::S(s)) => serde_json::from_str(s).ok(),
            _ => None,
        };
        let expires = match item.get("expires") {
            Some(AttributeValue::N(n)) => n.parse().ok(),
            _ => None,
        };
        Held { holder, expires }
    }

    /// Who, in words: `` `mesh apply` (pid 7 on ci) since 2026-...Z``.
    pub fn who(&self) -> String {
        match &self.holder {
            Some(h) => h.describe(),
            None => "an unknown run".to_owned(),
        }
    }

    /// Lapsed at `at` (no renewal since), so it may be taken over.
    pub fn lapsed(&self, at: u64) -> bool {
        self.expires.is_some_and(|e| e < at)
    }
}

/// The refusal: who holds the lock, since when, until when, and what to do.
pub fn refusal(scope: &Scope, region: &str, held: &Held) -> String {
    let dead = match &held.holder {
        Some(h) if !crate::lock::holder_running(h) => " — that process is no longer running",
        _ => "",
    };
    format!(
        "stack {} (environment {}) is locked by {}{dead} (item {} of DynamoDB table {TABLE} in {region}{})\n  help: wait for it to finish; if that run was killed, its lock lapses {DURATION_SECS} s after its last renewal, or break it with `mesh unlock {} --env {}`",
        scope.stack,
        scope.env,
        held.who(),
        item_id(scope),
        held.expires
            .map(|t| format!(", lapses at {}", format_time(t)))
            .unwrap_or_default(),
        scope.root.display(),
        scope.env,
    )
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A token of this acquisition: pid, time and randomness.
fn new_token(holder: &Holder) -> String {
    format!("{}-{}-{:016x}", holder.pid, holder.since, fastrand::u64(..))
}

impl AwsProvider {
    /// Makes sure the lock table exists and is ACTIVE, creating it on first use.
    async fn ensure_lock_table(&self) -> Result<(), ProviderError> {
        let created = std::sync::atomic::AtomicBool::new(false);
        let wait = Wait {
            what: "the lock table to be ACTIVE",
            timeout: TABLE_READY_TIMEOUT,
            every: Every::fixed(Duration::from_secs(1)),
            report: Report::Nothing,
        };
        poll_until(&wait, None, || async {
            let described = match self.describe_lock_table().await {
                Err(e)
                    if e.is("ResourceNotFoundException")
                        && !created.swap(true, std::sync::atomic::Ordering::Relaxed) =>
                {
                    self.create_lock_table().await?;
                    self.describe_lock_table().await
                }
                described => described,
            };
            Ok::<_, ProviderError>(match described.map_err(lock_error)? {
                None | Some(TableStatus::Active) => Polled::Done(()),
                Some(status) => Polled::Pending(status.as_str().to_owned()),
            })
        })
        .await
        .map_err(|w| match w {
            Waited::Failed(e) => e,
            Waited::TimedOut(_) | Waited::Interrupted => config_error(&format!(
                "the DynamoDB table {TABLE} (the stacks' locks) is not ACTIVE after {} s",
                TABLE_READY_TIMEOUT.as_secs()
            )),
        })
    }

    /// The lock table's status (`None`: the answer names none).
    async fn describe_lock_table(&self) -> Result<Option<TableStatus>, AwsError> {
        let out = self
            .limiter
            .call(
                Service::DynamoDb,
                "DescribeTable",
                self.dynamodb.describe_table().table_name(TABLE).send(),
            )
            .await?;
        Ok(out.table().and_then(|t| t.table_status()).cloned())
    }

    async fn create_lock_table(&self) -> Result<(), ProviderError> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| config_error(&e.to_string());
        let req = self
            .dynamodb
            .create_table()
            .table_name(TABLE)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(build)?,
            )
            .billing_mode(BillingMode::PayPerRequest);
        eprintln!(
            "Creating the DynamoDB table {TABLE} in {} (the locks of the stacks of this account; made once)",
            self.region
        );
        match self
            .limiter
            .call(Service::DynamoDb, "CreateTable", req.send())
            .await
        {
            Ok(_) => Ok(()),
            // Another run created it meanwhile.
            Err(e) if e.is("ResourceInUseException") => Ok(()),
            Err(e) => Err(lock_error(e)),
        }
    }

    /// Reads the lock item of `scope`, if any.
    async fn read_lock(&self, scope: &Scope) -> Result<Option<Held>, ProviderError> {
        let req = self
            .dynamodb
            .get_item()
            .table_name(TABLE)
            .key("id", s(item_id(scope)))
            .consistent_read(true);
        let out = self
            .limiter
            .call(Service::DynamoDb, "GetItem", req.send())
            .await
            .map_err(lock_error)?;
        Ok(out.item().map(Held::from_item))
    }

    /// Takes the lock of `scope`, or says who holds it.
    pub(super) async fn take_lock(
        &self,
        scope: &Scope,
        holder: &Holder,
    ) -> Result<Box<dyn SharedLock>, ProviderError> {
        self.ensure_lock_table().await?;
        let token = new_token(holder);
        let holder_json = serde_json::to_string(holder).unwrap_or_default();
        for _ in 0..3 {
            let at = now();
            let req = self
                .dynamodb
                .put_item()
                .table_name(TABLE)
                .item("id", s(item_id(scope)))
                .item("holder", s(holder_json.clone()))
                .item("token", s(token.clone()))
                .item("expires", n(at + DURATION_SECS))
                .item("renewed", n(at))
                .condition_expression("attribute_not_exists(#id) OR #expires < :now")
                .expression_attribute_names("#id", "id")
                .expression_attribute_names("#expires", "expires")
                .expression_attribute_values(":now", n(at))
                .return_values(ReturnValue::AllOld);
            match self
                .limiter
                .call(Service::DynamoDb, "PutItem", req.send())
                .await
            {
                Ok(out) => {
                    if let Some(old) = out.attributes().filter(|a| !a.is_empty()) {
                        let old = Held::from_item(old);
                        eprintln!(
                            "warning: took over the lapsed lock of stack {} (environment {}) held by {}: it was not renewed after {}",
                            scope.stack,
                            scope.env,
                            old.who(),
                            old.expires
                                .map(|t| format_time(t.saturating_sub(DURATION_SECS)))
                                .unwrap_or_else(|| "its start".to_owned()),
                        );
                    }
                    let renewer =
                        tokio::spawn(renew(self.dynamodb.clone(), scope.clone(), token.clone()));
                    return Ok(Box::new(TableLock {
                        client: self.dynamodb.clone(),
                        id: item_id(scope),
                        token,
                        renewer,
                    }));
                }
                Err(e) if e.is("ConditionalCheckFailedException") => {
                    match self.read_lock(scope).await? {
                        Some(held) if !held.lapsed(now()) => {
                            return Err(ProviderError::Locked(refusal(scope, &self.region, &held)));
                        }
                        // Released or lapsed between our write and read: try again.
                        _ => continue,
                    }
                }
                Err(e) => return Err(lock_error(e)),
            }
        }
        Err(ProviderError::Locked(format!(
            "stack {} (environment {}): another run keeps taking item {} of DynamoDB table {TABLE}; try again",
            scope.stack,
            scope.env,
            item_id(scope)
        )))
    }

    /// Deletes the lock item of `scope` whoever holds it; who held it.
    pub(super) async fn break_lock(&self, scope: &Scope) -> Result<Option<String>, ProviderError> {
        let req = self
            .dynamodb
            .delete_item()
            .table_name(TABLE)
            .key("id", s(item_id(scope)))
            .return_values(ReturnValue::AllOld);
        match self
            .limiter
            .call(Service::DynamoDb, "DeleteItem", req.send())
            .await
        {
            Ok(out) => Ok(out.attributes().filter(|a| !a.is_empty()).map(|old| {
                format!(
                    "{} (item {} of DynamoDB table {TABLE} in {})",
                    Held::from_item(old).who(),
                    item_id(scope),
                    self.region
                )
            })),
            // No table yet: nobody ever locked a stack of this account here.
            Err(e) if e.is("ResourceNotFoundException") => Ok(None),
            Err(e) => Err(lock_error(e)),
        }
    }
}

fn lock_error(e: AwsError) -> ProviderError {
    config_error(&format!(
        "the stack's lock (DynamoDB table {TABLE}): {}",
        e.message
    ))
}

/// Keeps the lock alive while held; stops (with a warning) once it was
/// broken or taken over.
async fn renew(client: aws_sdk_dynamodb::Client, scope: Scope, token: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let at = now();
        let res = client
            .update_item()
            .table_name(TABLE)
            .key("id", s(item_id(&scope)))
            .update_expression("SET #expires = :expires, #renewed = :now")
            .condition_expression("#token = :token")
            .expression_attribute_names("#expires", "expires")
            .expression_attribute_names("#renewed", "renewed")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":expires", n(at + DURATION_SECS))
            .expression_attribute_values(":now", n(at))
            .expression_attribute_values(":token", s(token.clone()))
            .send()
            .await;
        if let Err(e) = res {
            let e = super::call::classify("UpdateItem", e);
            if e.is("ConditionalCheckFailedException") {
                eprintln!(
                    "warning: the lock of stack {} (environment {}) in DynamoDB table {TABLE} was broken or taken over; this run no longer holds it",
                    scope.stack, scope.env
                );
                return;
            }
            // Anything else: the next round tries again, well before it lapses.
        }
    }
}

struct TableLock {
    client: aws_sdk_dynamodb::Client,
    id: String,
    token: String,
    renewer: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl SharedLock for TableLock {
    async fn release(self: Box<Self>) {
        self.renewer.abort();
        let res = self
            .client
            .delete_item()
            .table_name(TABLE)
            .key("id", s(self.id.clone()))
            .condition_expression("#token = :token")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":token", s(self.token.clone()))
            .send()
            .await;
        if let Err(e) = res {
            let e = super::call::classify("DeleteItem", e);
            // Taken over or broken meanwhile: not ours to delete.
            if !e.is("ConditionalCheckFailedException") {
                eprintln!(
                    "warning: could not release the lock {} in DynamoDB table {TABLE}: {}; it lapses in {DURATION_SECS} s",
                    self.id, e.message
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope {
            stack: "platform".into(),
            env: "dev".into(),
            root: "stacks/platform".into(),
        }
    }

    #[test]
    fn the_refusal_names_the_holder_the_item_and_the_way_out() {
        let held = Held {
            holder: Some(Holder {
                pid: 7,
                host: "ci-runner".into(),
                command: "mesh apply".into(),
                since: 1_795_000_000,
            }),
            expires: Some(1_795_000_060),
        };
        let msg = refusal(&scope(), "us-east-1", &held);
        assert_eq!(
            msg.lines().next().unwrap(),
            "stack platform (environment dev) is locked by `mesh apply` (pid 7 on ci-runner) since 2026-11-18T11:06:40Z (item platform/dev of DynamoDB table mesh-locks in us-east-1, lapses at 2026-11-18T11:07:40Z)"
        );
        assert!(
            msg.contains("break it with `mesh unlock stacks/platform --env dev`"),
            "{msg}"
        );
    }

    #[test]
    fn an_item_lapses_after_its_expiry_and_reads_without_a_holder() {
        let mut item = HashMap::new();
        item.insert("expires".to_owned(), n(100));
        item.insert("holder".to_owned(), s("not json"));
        let held = Held::from_item(&item);
        assert_eq!(held.holder, None);
        assert_eq!(held.who(), "an unknown run");
        assert!(!held.lapsed(100));
        assert!(held.lapsed(101));
        assert!(!Held::from_item(&HashMap::new()).lapsed(u64::MAX));
    }
}
