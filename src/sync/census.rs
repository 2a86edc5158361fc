//! A census of the target's groups, read once for a batch that creates several of them.
//!
//! A group is looked up before it is created (group names are rarely unique on a target, so a
//! POST would not reveal a duplicate): by externalId, then by displayName, two requests a
//! group. A batch creating many groups instead pages through /Groups once and looks them up
//! in what it read, with the same identity rules (`scim::has_identity`). The census is used
//! only when the listing proves complete: every page reports the same `totalResults`, every
//! resource has an id, no id comes twice, as many came as were announced, and a page past the
//! announced end is empty. Otherwise the batch falls back to looking each group up, as before.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::directory::Kind;
use crate::target::TargetClient;

/// Groups a census reads at most (a few MB of ids and names); a target with more has its
/// groups looked up one by one.
pub(super) const MAX_GROUPS: u64 = 20_000;

/// The ids and identities of every group the target held when the census was read.
#[derive(Debug, Default)]
pub(super) struct Census {
    ids: Vec<String>,
    /// externalId → the first group (in listing order) carrying it; compared exactly.
    by_external_id: HashMap<String, usize>,
    /// displayName, ASCII-lowercased → the first group carrying it (compared as RFC 7643
    /// compares displayName: case-insensitively).
    by_name: HashMap<String, usize>,
}

impl Census {
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    fn add(&mut self, resource: &Value) -> Result<(), String> {
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .ok_or("a listed group has no id")?;
        let i = self.ids.len();
        self.ids.push(id.to_string());
        if let Some(x) = resource.get("externalId").and_then(Value::as_str) {
            self.by_external_id.entry(x.to_string()).or_insert(i);
        }
        if let Some(n) = resource.get("displayName").and_then(Value::as_str) {
            self.by_name.entry(n.to_ascii_lowercase()).or_insert(i);
        }
        Ok(())
    }

    /// The remote id of the group matching `keys` (in `scim::match_keys` order: the first key
    /// with a match wins, as the lookups by filter do), and the key that matched.
    pub(super) fn find<'k>(
        &self,
        keys: &'k [(&'static str, String)],
    ) -> Option<(&str, &'k (&'static str, String))> {
        keys.iter().find_map(|k| {
            let (key, value) = k;
            let hit = if *key == "externalId" {
                self.by_external_id.get(value)
            } else {
                self.by_name.get(&value.to_ascii_lowercase())
            };
            hit.map(|&i| (self.ids[i].as_str(), k))
        })
    }
}

/// Whether a census of `total` groups, `page` a page, fits in `max_pages` requests: its
/// pages and, when there are groups, the one past the announced end that confirms it (a
/// target that caps its listing and counts only what it returned shows more there, or,
/// ignoring startIndex, ids again).
pub(super) fn fits(total: u64, page: usize, max_pages: usize) -> bool {
    total.div_ceil(page.max(1) as u64) + u64::from(total > 0) <= max_pages as u64
}

/// One page of /Groups from `start` (1-based).
async fn page_at(
    client: &TargetClient,
    start: usize,
    page: usize,
) -> Result<crate::target::ListPage, String> {
    client
        .list_page(Kind::Group, start, page)
        .await
        .map_err(|e| format!("listing /Groups failed: {e}"))
}

/// Pages through /Groups, `page` at a time, reading at most `max_pages` pages. Err says why
/// the census cannot be trusted or would cost more than it saves; the caller then looks each
/// group up. `total_seen` is told the total the target reported, when it reported one.
pub(super) async fn read(
    client: &TargetClient,
    page: usize,
    max_pages: usize,
    total_seen: impl FnOnce(u64),
) -> Result<Census, String> {
    let first = page_at(client, 1, page).await?;
    let total = first.total.ok_or("the listing has no totalResults")?;
    total_seen(total);
    if total > MAX_GROUPS {
        return Err(format!(
            "the target has {total} groups (more than {MAX_GROUPS})"
        ));
    }
    if !fits(total, page, max_pages) {
        return Err(format!(
            "{total} groups take more than {max_pages} pages of {page}"
        ));
    }
    let mut census = Census::default();
    let mut seen = HashSet::new();
    let mut resources = first.resources;
    let mut pages = 1;
    loop {
        if resources.is_empty() && (census.len() as u64) < total {
            return Err(format!(
                "the listing ended after {} of {total} groups",
                census.len()
            ));
        }
        for r in &resources {
            census.add(r)?;
            if !seen.insert(census.ids[census.len() - 1].clone()) {
                return Err("a group was listed twice (the listing moved while read)".into());
            }
        }
        if census.len() as u64 > total {
            return Err(format!("the listing holds more than its {total} groups"));
        }
        if census.len() as u64 == total {
            if total == 0 {
                return Ok(census);
            }
            let past = page_at(client, census.len() + 1, page).await?;
            if !past.resources.is_empty() {
                return Err(format!("groups are listed past the announced {total}"));
            }
            return Ok(census);
        }
        // Room for the next page and the confirming one.
        if pages + 1 >= max_pages {
            return Err(format!(
                "{total} groups take more than {max_pages} pages of {page}"
            ));
        }
        let next = page_at(client, census.len() + 1, page).await?;
        if next.total != Some(total) {
            return Err("the number of groups changed while they were listed".into());
        }
        resources = next.resources;
        pages += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn census(groups: &[Value]) -> Census {
        let mut c = Census::default();
        for g in groups {
            c.add(g).expect("group with id");
        }
        c
    }

    fn keys(external: &str, name: &str) -> Vec<(&'static str, String)> {
        vec![
            ("externalId", external.to_string()),
            ("displayName", name.to_string()),
        ]
    }

    #[test]
    fn external_id_wins_over_name_and_names_ignore_case() {
        let c = census(&[
            json!({"id": "a", "displayName": "Team"}),
            json!({"id": "b", "displayName": "Other", "externalId": "g-1"}),
            json!({"id": "c", "displayName": "TEAM"}),
        ]);
        let k = keys("g-1", "Team");
        assert_eq!(
            c.find(&k).map(|(id, key)| (id, key.0)),
            Some(("b", "externalId"))
        );
        let k = keys("g-2", "team");
        assert_eq!(
            c.find(&k).map(|(id, key)| (id, key.0)),
            Some(("a", "displayName")),
            "the first listed namesake, compared case-insensitively"
        );
        assert!(
            c.find(&keys("G-1", "Nobody")).is_none(),
            "externalId is exact"
        );
    }

    #[test]
    fn a_census_fits_with_its_confirming_page() {
        assert!(
            fits(0, 100, 1),
            "an empty target: one page, nothing to confirm"
        );
        assert!(fits(100, 100, 2), "one full page and the one past it");
        assert!(!fits(101, 100, 2));
        assert!(!fits(450, 200, 3), "three pages and the confirming one");
    }

    #[test]
    fn a_group_without_id_is_refused() {
        let mut c = Census::default();
        assert!(c.add(&json!({"displayName": "Team"})).is_err());
    }
}
