//! Connectors: the `STORED AS` names flumen adds to DataFusion, and what they share.
//!
//! A connector is a DataFusion [`TableProviderFactory`]. Adding a backend is one folder under
//! `src/connector/`, one line in [`Registry::builtin`], and its tests. Files (CSV, JSON, PARQUET,
//! AVRO, ARROW) stay DataFusion's own factories and are not listed here.

pub mod broker;
pub mod clickhouse;
pub mod elasticsearch;
#[cfg(feature = "test-backends")]
pub mod faulty;
pub mod generate;
pub mod http;
pub mod kafka;
pub mod mongodb;
pub mod mqtt;
pub mod nats;
pub mod options;
pub mod rabbitmq;
pub mod redis;
pub mod scan;
pub mod sql;

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::catalog::TableProviderFactory;
use datafusion::execution::session_state::SessionStateBuilder;

/// The `STORED AS` names DataFusion itself handles (files through `object_store`).
pub const FILE_FORMATS: &[&str] = &["CSV", "JSON", "NDJSON", "PARQUET", "AVRO", "ARROW"];

/// Maps `STORED AS` names to the factories that build their tables.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    factories: BTreeMap<String, Arc<dyn TableProviderFactory>>,
}

impl Registry {
    /// A registry with no connectors: only DataFusion's file formats will work.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Every connector flumen ships.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register("GENERATE", Arc::new(generate::GenerateFactory));
        r.register("CLICKHOUSE", Arc::new(clickhouse::ClickHouseFactory));
        r.register("ELASTICSEARCH", Arc::new(elasticsearch::ElasticsearchFactory));
        r.register("MYSQL", Arc::new(sql::SqlFactory(sql::dialect::Dialect::MySql)));
        r.register(
            "POSTGRES",
            Arc::new(sql::SqlFactory(sql::dialect::Dialect::Postgres)),
        );
        r.register("SQLITE", Arc::new(sql::SqlFactory(sql::dialect::Dialect::Sqlite)));
        r.register("REDIS", Arc::new(redis::RedisFactory));
        r.register("MONGODB", Arc::new(mongodb::MongoFactory));
        r.register("HTTP", Arc::new(http::HttpFactory));
        r.register("REDIS_STREAM", Arc::new(redis::stream::RedisStreamFactory));
        r.register("KAFKA", Arc::new(kafka::KafkaFactory));
        r.register("NATS", Arc::new(nats::NatsFactory));
        r.register("RABBITMQ", Arc::new(rabbitmq::RabbitFactory));
        r.register("MQTT", Arc::new(mqtt::MqttFactory));
        #[cfg(feature = "test-backends")]
        r.register("FAULTY", Arc::new(faulty::FaultyFactory));
        r
    }

    /// Adds (or replaces) the factory for `STORED AS name`; names are case-insensitive.
    pub fn register(&mut self, name: &str, factory: Arc<dyn TableProviderFactory>) -> &mut Self {
        self.factories.insert(name.to_ascii_uppercase(), factory);
        self
    }

    /// The factory for `STORED AS name` (case-insensitive), if a connector has it.
    pub fn factory(&self, name: &str) -> Option<Arc<dyn TableProviderFactory>> {
        self.factories.get(&name.to_ascii_uppercase()).cloned()
    }

    /// The same connectors, each wrapped by `wrap` (on a cluster: so that their tables
    /// remember how they were created).
    pub fn map(&self, wrap: impl Fn(Arc<dyn TableProviderFactory>) -> Arc<dyn TableProviderFactory>) -> Self {
        Self {
            factories: self
                .factories
                .iter()
                .map(|(k, f)| (k.clone(), wrap(Arc::clone(f))))
                .collect(),
        }
    }

    /// The connector names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Whether `STORED AS name` can be created, by a connector or as a file format.
    pub fn knows(&self, name: &str) -> bool {
        let upper = name.to_ascii_uppercase();
        self.factories.contains_key(&upper) || FILE_FORMATS.contains(&upper.as_str())
    }

    /// All names a user may write after `STORED AS`, sorted, for error messages.
    pub fn all_names(&self) -> Vec<String> {
        let mut all: Vec<String> = FILE_FORMATS.iter().map(|s| s.to_string()).collect();
        all.extend(self.factories.keys().cloned());
        all.sort();
        all.dedup();
        all
    }

    /// Adds every connector to a session being built (DataFusion's file factories stay).
    pub fn install(&self, mut builder: SessionStateBuilder) -> SessionStateBuilder {
        let factories = builder.table_factories().get_or_insert_with(Default::default);
        for (name, f) in &self.factories {
            factories.insert(name.clone(), Arc::clone(f));
        }
        builder
    }
}
