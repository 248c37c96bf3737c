//! `STORED AS ELASTICSEARCH`: write documents with the bulk API that Elasticsearch 7/8 and
//! OpenSearch share.
//!
//! ```sql
//! CREATE EXTERNAL TABLE docs (id BIGINT, title VARCHAR, at TIMESTAMP) STORED AS ELASTICSEARCH
//!   LOCATION 'https://search.internal:9200'
//!   OPTIONS ('index' 'articles-{at:%Y.%m}', 'id_column' 'id', 'api_key' '${ES_API_KEY}');
//! INSERT INTO docs SELECT ...;
//! ```
//!
//! Bodies are built from the Arrow columns by [`bulk`] (arrow-json's encoders for documents);
//! the answer is read item by item: 429/5xx items are sent again alone, other refusals go to
//! dead letters with the server's reason. Without `id_column` every document gets an id made
//! from its request's delivery token and its row, so a request sent again (retry or `flumen
//! resume`) overwrites instead of duplicating. Missing indices are created with a mapping
//! derived from the columns ([`mapping`]) unless `'create_index' 'never'`.
//!
//! HTTP is reqwest, not the `elasticsearch` crate: the bulk body is flumen's own bytes, the
//! crate would only wrap the same client, and it pulls a second HTTP stack into the build.

pub mod bulk;
pub mod mapping;
mod sink;
pub mod source;
pub mod udf;

pub use sink::ElasticsearchFactory;
