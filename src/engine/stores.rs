//! Object stores created on first use from a URL, with credentials from the environment.

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::{ClientOptions, ObjectStore};
use url::Url;

/// An [`ObjectStoreRegistry`] that builds a store the first time a URL's bucket is used.
///
/// | scheme | store | credentials and settings |
/// |---|---|---|
/// | `file://`, plain paths | local file system | — |
/// | `s3://`, `s3a://` | Amazon S3 (and compatibles via `AWS_ENDPOINT`) | `AWS_*` variables |
/// | `gs://` | Google Cloud Storage | `GOOGLE_*` variables |
/// | `az://`, `abfs://`, `abfss://`, `azure://` | Azure Blob Storage | `AZURE_*` variables |
/// | `http://`, `https://` | plain HTTP (GET, HEAD; WebDAV for listing) | — |
#[derive(Debug, Default)]
pub struct LazyStoreRegistry {
    inner: DefaultObjectStoreRegistry,
}

impl LazyStoreRegistry {
    /// A registry with the local file system registered.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Builds the store for `url`'s scheme and bucket (or host), or `None` for an unknown scheme.
fn build_store(url: &Url) -> Option<Result<Arc<dyn ObjectStore>>> {
    let base = &url[..url::Position::BeforePath];
    let store: object_store::Result<Arc<dyn ObjectStore>> = match url.scheme() {
        "s3" | "s3a" => AmazonS3Builder::from_env()
            .with_url(base)
            .build()
            .map(|s| Arc::new(s) as _),
        "gs" => GoogleCloudStorageBuilder::from_env()
            .with_url(base)
            .build()
            .map(|s| Arc::new(s) as _),
        "az" | "abfs" | "abfss" | "azure" | "adl" => MicrosoftAzureBuilder::from_env()
            .with_url(base)
            .build()
            .map(|s| Arc::new(s) as _),
        "http" | "https" => HttpBuilder::new()
            .with_url(base)
            // The user wrote http:// explicitly; object_store refuses plain HTTP unless told.
            .with_client_options(ClientOptions::new().with_allow_http(url.scheme() == "http"))
            .build()
            .map(|s| Arc::new(s) as _),
        _ => return None,
    };
    Some(store.map_err(|e| DataFusionError::ObjectStore(Box::new(e))))
}

impl ObjectStoreRegistry for LazyStoreRegistry {
    fn register_store(&self, url: &Url, store: Arc<dyn ObjectStore>) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.inner.get_store(url) {
            return Ok(store);
        }
        match build_store(url) {
            Some(store) => {
                let store = store?;
                self.inner.register_store(url, Arc::clone(&store));
                Ok(store)
            }
            None => Err(DataFusionError::Configuration(format!(
                "no object store for scheme '{}' in {}: flumen reads file://, s3://, gs://, az://, abfs(s)://, http(s)://",
                url.scheme(),
                &url[..url::Position::BeforePath]
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_http_store_lazily_and_reuses_it() {
        let reg = LazyStoreRegistry::new();
        let u = Url::parse("http://127.0.0.1:1/data/x.csv").unwrap();
        let a = reg.get_store(&u).unwrap();
        let b = reg
            .get_store(&Url::parse("http://127.0.0.1:1/other.csv").unwrap())
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn unknown_scheme_names_supported_ones() {
        let reg = LazyStoreRegistry::new();
        let e = reg
            .get_store(&Url::parse("ftp://host/x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp") && e.contains("s3://"), "{e}");
    }

    #[test]
    fn s3_store_builds_from_url() {
        let reg = LazyStoreRegistry::new();
        assert!(
            reg.get_store(&Url::parse("s3://bucket/key.parquet").unwrap())
                .is_ok()
        );
    }
}
