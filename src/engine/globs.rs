//! Globs in object-store locations: `LOCATION 's3://bucket/orders/2026-*.csv.gz'`.
//!
//! DataFusion expands globs in local paths only; a URL with a scheme is taken literally and finds
//! no files. flumen lists the store under the glob's fixed prefix when the table is created and
//! hands DataFusion the matching files as the table's locations. Files added to the bucket later
//! are not seen by that table: create it again (or point it at a directory) to pick them up.

use datafusion::datasource::listing::ListingTableUrl;
use datafusion::logical_expr::{CreateExternalTable, DdlStatement, LogicalPlan};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use glob::{MatchOptions, Pattern};

use crate::error::{Error, Result};

const GLOB_CHARS: &[char] = &['*', '?', '['];

/// Splits `s3://b/dir/part-*.csv` into (`s3://b/dir/`, `part-*.csv`) when it is a remote URL
/// with a glob; `None` for local paths and URLs without glob characters.
fn split_remote_glob(location: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = location.split_once("://")?;
    if scheme == "file" {
        return None;
    }
    let at = rest.find(GLOB_CHARS)?;
    let cut = rest[..at].rfind('/')? + 1;
    let split = scheme.len() + 3 + cut;
    Some((&location[..split], &location[split..]))
}

/// Rewrites a `CREATE EXTERNAL TABLE` whose remote locations hold globs to list the matching
/// files instead; every other plan is returned unchanged.
pub async fn expand(ctx: &SessionContext, plan: LogicalPlan) -> Result<LogicalPlan> {
    let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) = &plan else {
        return Ok(plan);
    };
    // Connector locations are URLs whose `?` starts a query string, not a glob.
    let files = crate::connector::FILE_FORMATS.contains(&cmd.file_type.to_ascii_uppercase().as_str());
    if !files || !cmd.locations.iter().any(|l| split_remote_glob(l).is_some()) {
        return Ok(plan);
    }
    let mut locations = Vec::new();
    for location in &cmd.locations {
        let Some((prefix, glob)) = split_remote_glob(location) else {
            locations.push(location.clone());
            continue;
        };
        let pattern = Pattern::new(glob).map_err(|e| {
            Error::Config(format!(
                "table {}: bad glob in LOCATION '{location}': {e}",
                cmd.name
            ))
        })?;
        let url = ListingTableUrl::parse(prefix)?;
        let store = ctx.runtime_env().object_store(url.object_store())?;
        let base = url.prefix().as_ref().to_string();
        let options = MatchOptions {
            require_literal_separator: true,
            ..MatchOptions::default()
        };
        let mut matched: Vec<String> = store
            .list(Some(url.prefix()))
            .map_ok(|meta| meta.location.as_ref().to_string())
            .try_filter(|key| {
                let rel = key.strip_prefix(&base).unwrap_or(key).trim_start_matches('/');
                futures::future::ready(pattern.matches_with(rel, options))
            })
            .try_collect()
            .await?;
        if matched.is_empty() {
            return Err(Error::Config(format!(
                "table {}: no files match LOCATION '{location}'",
                cmd.name
            )));
        }
        matched.sort();
        let root = url.object_store();
        let root = root.as_str().trim_end_matches('/');
        locations.extend(matched.into_iter().map(|key| format!("{root}/{key}")));
    }
    let expanded = CreateExternalTable {
        locations,
        ..(**cmd).clone()
    };
    Ok(LogicalPlan::Ddl(DdlStatement::CreateExternalTable(Box::new(
        expanded,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn splits_remote_globs_only() {
        assert_eq!(
            split_remote_glob("s3://b/orders/2026-*.csv.gz"),
            Some(("s3://b/orders/", "2026-*.csv.gz"))
        );
        assert_eq!(
            split_remote_glob("gs://b/a/*/x.parquet"),
            Some(("gs://b/a/", "*/x.parquet"))
        );
        assert_eq!(split_remote_glob("s3://b/orders/"), None);
        assert_eq!(split_remote_glob("/local/*.csv"), None);
        assert_eq!(split_remote_glob("file:///local/*.csv"), None);
    }

    #[tokio::test]
    async fn expands_against_a_store() {
        use object_store::memory::InMemory;
        use object_store::{ObjectStoreExt, PutPayload};
        let ctx = SessionContext::new();
        let store = Arc::new(InMemory::new());
        for key in ["d/part-1.csv", "d/part-2.csv", "d/other.csv", "d/sub/part-3.csv"] {
            store
                .put(&key.into(), PutPayload::from_static(b"a\n1\n"))
                .await
                .unwrap();
        }
        ctx.register_object_store(&url::Url::parse("s3://bkt").unwrap(), store);
        let plan = ctx
            .state()
            .create_logical_plan("CREATE EXTERNAL TABLE t STORED AS CSV LOCATION 's3://bkt/d/part-*.csv'")
            .await
            .unwrap();
        let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) = expand(&ctx, plan).await.unwrap()
        else {
            panic!("not a create");
        };
        assert_eq!(
            cmd.locations,
            vec!["s3://bkt/d/part-1.csv", "s3://bkt/d/part-2.csv"]
        );
    }
}
