//! What a target supports, from the cache every worker shares, or asked of the target (then
//! cached for `spc_cache_ttl` under the target's settings fingerprint).

use serde_json::Value;

use crate::config::TargetConfig;
use crate::scim::Capabilities;
use crate::store::Store;
use crate::target::{Effective, TargetClient, TargetError, groups_offered};

/// The effective capabilities of a target; `write_cache` is false for dry runs.
pub async fn discover(
    store: &Store,
    client: &TargetClient,
    cfg: &TargetConfig,
    write_cache: bool,
) -> Effective {
    // Both documents at once: a cold start waits for one round trip to the target, not two.
    let (spc, types) = tokio::join!(
        cached(store, client, cfg, "spc", write_cache, || {
            client.service_provider_config()
        }),
        cached(store, client, cfg, "resource_types", write_cache, || {
            client.discovery("ResourceTypes")
        })
    );
    let caps = match spc {
        Some(v) if v.is_object() => Capabilities::from_spc(&v),
        Some(_) => {
            tracing::warn!(target = %cfg.name, "ServiceProviderConfig is not a JSON object; assuming no PATCH, no filter, no bulk");
            Capabilities::conservative()
        }
        None => Capabilities::conservative(),
    };
    client.preset_capabilities(caps.clone());
    // Methods the target refused before (405/501), learned by any worker; they do not expire
    // with the TTL, only with a change of the target's settings.
    if let Ok(Some(refused)) = store
        .cache_get(&cfg.name, "refused", &cfg.fingerprint(), i64::MAX / 2)
        .await
    {
        client.apply_refusals(&refused);
    }
    let groups = types.as_ref().and_then(groups_offered).unwrap_or(true);
    Effective::new(&caps, &client.profile, &cfg.capabilities, groups)
}

async fn cached<F, Fut>(
    store: &Store,
    client: &TargetClient,
    cfg: &TargetConfig,
    key: &str,
    write_cache: bool,
    fetch: F,
) -> Option<Value>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Value, TargetError>>,
{
    let fp = cfg.fingerprint();
    let ttl_ms = i64::try_from(cfg.spc_cache_ttl.0.saturating_mul(1000)).unwrap_or(i64::MAX);
    match store.cache_get(&cfg.name, key, &fp, ttl_ms).await {
        Ok(Some(v)) => return Some(v),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(target = %cfg.name, error = %e, "cannot read the capability cache")
        }
    }
    match fetch().await {
        Ok(v) => {
            if write_cache && let Err(e) = store.cache_put(&cfg.name, key, &fp, &v).await {
                tracing::warn!(target = %cfg.name, error = %e, "cannot write the capability cache");
            }
            Some(v)
        }
        Err(e) => {
            let what = if key == "spc" {
                "ServiceProviderConfig; assuming no PATCH, no filter, no bulk"
            } else {
                "ResourceTypes; assuming Users and Groups"
            };
            tracing::warn!(target = %client.name(), error = %e, "cannot read {what}");
            None
        }
    }
}
