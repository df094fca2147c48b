//! Route matching: method + path (prefix or glob), in order, first match wins. Requests
//! are matched on their path in normal form (`crate::path`), so prefixes are written in
//! normal form too.

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

use crate::config::{Config, ConfigError, OnUnavailable, ReserveConfig, RouteConfig, Unmatched};

/// How many units a request costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitsRule {
    Fixed(ledger::Units),
    /// From a request header.
    Header(http::HeaderName),
    /// Hold an estimate, commit the actual from a response header.
    Reserve(Reserve),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserve {
    pub estimate: ledger::Units,
    pub estimate_header: Option<http::HeaderName>,
    pub actual_header: http::HeaderName,
    pub ttl_secs: i64,
}

/// A gated route, ready for the hot path.
#[derive(Debug, Clone)]
pub struct Route {
    /// The route's position in the file (for metrics and logs).
    pub index: usize,
    pub method: Option<http::Method>,
    matcher: Matcher,
    pub public: bool,
    pub feature: Option<ledger::FeatureKey>,
    pub units: UnitsRule,
    pub on_unavailable: OnUnavailable,
    pub outage_budget: Option<u64>,
    pub charge_upstream_errors: bool,
}

#[derive(Debug, Clone)]
enum Matcher {
    Prefix(String),
    Glob(GlobMatcher),
}

impl Matcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Prefix(prefix) => path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/')
            }),
            Matcher::Glob(glob) => glob.is_match(path),
        }
    }
}

/// All routes, in order.
#[derive(Debug, Clone)]
pub struct Routes {
    routes: Arc<[Route]>,
    pub unmatched: Unmatched,
}

fn header_name(setting: &str, name: &str) -> Result<http::HeaderName, ConfigError> {
    http::HeaderName::from_bytes(name.as_bytes()).map_err(|error| ConfigError {
        setting: setting.into(),
        message: format!("{name:?}: {error}"),
    })
}

impl Routes {
    /// # Errors
    /// The route and setting at fault.
    pub fn from_config(config: &Config) -> Result<Routes, ConfigError> {
        let routes: Result<Vec<Route>, ConfigError> = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| Route::from_config(index, route, config))
            .collect();
        Ok(Routes {
            routes: routes?.into(),
            unmatched: config.unmatched,
        })
    }

    /// The first route for `method` and `path` (the path without its query).
    pub fn find(&self, method: &http::Method, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| {
            route.method.as_ref().is_none_or(|wanted| wanted == method)
                && route.matcher.matches(path)
        })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    fn from_config(
        index: usize,
        route: &RouteConfig,
        config: &Config,
    ) -> Result<Route, ConfigError> {
        let at = |field: &str| {
            if field.is_empty() {
                format!("routes[{index}]")
            } else {
                format!("routes[{index}].{field}")
            }
        };
        let fail = |field: &str, message: String| ConfigError {
            setting: at(field),
            message,
        };
        let method = route
            .method
            .as_deref()
            .map(|text| {
                http::Method::from_bytes(text.to_ascii_uppercase().as_bytes())
                    .map_err(|error| fail("method", error.to_string()))
            })
            .transpose()?;
        if !route.path.starts_with('/') {
            return Err(fail("path", "must start with '/'".into()));
        }
        let matcher = if route.path.contains(['*', '?', '[', '{']) {
            let glob = GlobBuilder::new(&route.path)
                .literal_separator(true)
                .build()
                .map_err(|error| fail("path", error.to_string()))?;
            Matcher::Glob(glob.compile_matcher())
        } else {
            // Requests are matched in normal form: a prefix that is not would never match.
            match crate::path::normalise(route.path.as_bytes()) {
                Ok(normal) if normal == route.path => {}
                Ok(normal) => {
                    return Err(fail(
                        "path",
                        format!("requests are matched in normal form: write {normal:?}"),
                    ));
                }
                Err(error) => return Err(fail("path", error.to_string())),
            }
            Matcher::Prefix(route.path.clone())
        };
        let feature = match (&route.feature, route.public) {
            (Some(key), _) => Some(
                ledger::FeatureKey::new(key).map_err(|error| fail("feature", error.to_string()))?,
            ),
            (None, true) => None,
            (None, false) => {
                return Err(fail(
                    "feature",
                    "is required unless the route is public".into(),
                ));
            }
        };
        let modes = [
            route.units.is_some(),
            route.units_header.is_some(),
            route.reserve.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if modes > 1 {
            return Err(fail(
                "",
                "give at most one of units, units_header and reserve".into(),
            ));
        }
        let units_of = |field: &str, value: u64| {
            ledger::Units::new(value)
                .ok_or_else(|| fail(field, format!("must be 1 to {}", ledger::UNITS_MAX)))
        };
        let units = match (&route.units, &route.units_header, &route.reserve) {
            (_, Some(name), _) => UnitsRule::Header(header_name(&at("units_header"), name)?),
            (_, _, Some(reserve)) => {
                UnitsRule::Reserve(Reserve::from_config(reserve, &at, &units_of)?)
            }
            (Some(units), _, _) => UnitsRule::Fixed(units_of("units", *units)?),
            (None, None, None) => UnitsRule::Fixed(ledger::Units::ONE),
        };
        if route.outage_budget == Some(0) {
            return Err(fail(
                "outage_budget",
                "must be at least 1 (use on_unavailable = \"closed\" to refuse all)".into(),
            ));
        }
        Ok(Route {
            index,
            method,
            matcher,
            public: route.public,
            feature,
            units,
            on_unavailable: route
                .on_unavailable
                .unwrap_or(config.failure.on_unavailable),
            outage_budget: route.outage_budget,
            charge_upstream_errors: route
                .charge_upstream_errors
                .unwrap_or(config.usage.charge_upstream_errors),
        })
    }
}

impl Reserve {
    fn from_config(
        reserve: &ReserveConfig,
        at: &dyn Fn(&str) -> String,
        units_of: &dyn Fn(&str, u64) -> Result<ledger::Units, ConfigError>,
    ) -> Result<Reserve, ConfigError> {
        let ttl_secs = reserve.ttl_secs(at)?;
        if !(1..=ledger::TTL_MAX_SECS).contains(&ttl_secs) {
            return Err(ConfigError {
                setting: at("reserve.ttl_secs"),
                message: format!("must be 1 to {}", ledger::TTL_MAX_SECS),
            });
        }
        Ok(Reserve {
            estimate: units_of("reserve.estimate", reserve.estimate)?,
            estimate_header: reserve
                .estimate_header
                .as_deref()
                .map(|name| header_name(&at("reserve.estimate_header"), name))
                .transpose()?,
            actual_header: header_name(&at("reserve.actual_header"), &reserve.actual_header)?,
            ttl_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(extra: &str) -> Routes {
        let text = format!(
            r#"
upstream = "127.0.0.1:3000"
[control_plane]
url = "http://127.0.0.1:8080"
api_key = "k"
{extra}
"#
        );
        let config = Config::parse(&text).expect("parses");
        Routes::from_config(&config).expect("valid")
    }

    #[test]
    fn first_match_wins_by_method_and_path() {
        let routes = routes(
            r#"
[[routes]]
path = "/health"
public = true
[[routes]]
method = "POST"
path = "/v1/chat"
feature = "chat"
[[routes]]
path = "/v1/models/*/generate"
feature = "gen"
units_header = "x-units"
[[routes]]
path = "/v1"
feature = "api"
"#,
        );
        let find =
            |method: http::Method, path: &str| routes.find(&method, path).map(|route| route.index);
        assert_eq!(find(http::Method::GET, "/health"), Some(0));
        assert_eq!(find(http::Method::POST, "/v1/chat"), Some(1));
        assert_eq!(find(http::Method::POST, "/v1/chat/x"), Some(1));
        assert_eq!(
            find(http::Method::GET, "/v1/chat"),
            Some(3),
            "method filters"
        );
        assert_eq!(
            find(http::Method::POST, "/v1/chatty"),
            Some(3),
            "prefix stops at a segment"
        );
        assert_eq!(find(http::Method::POST, "/v1/models/m1/generate"), Some(2));
        assert_eq!(
            find(http::Method::POST, "/v1/models/a/b/generate"),
            Some(3),
            "* stays in a segment"
        );
        assert_eq!(find(http::Method::GET, "/other"), None);
    }

    #[test]
    fn a_prefix_not_in_normal_form_is_refused() {
        for path in ["/v1//chat", "/v1/./chat", "/v1/%63hat", "/v1/../chat"] {
            let text = format!(
                "upstream = \"127.0.0.1:3000\"\n[control_plane]\nurl = \"http://127.0.0.1:8080\"\napi_key = \"k\"\n[[routes]]\npath = {path:?}\nfeature = \"chat\"\n"
            );
            let config = Config::parse(&text).expect("parses");
            let error = Routes::from_config(&config).expect_err(path);
            assert_eq!(error.setting, "routes[0].path", "{path}: {error}");
        }
    }

    #[test]
    fn units_rules_are_read() {
        let routes = routes(
            r#"
[[routes]]
path = "/a"
feature = "f"
units = 3
[[routes]]
path = "/b"
feature = "f"
reserve = { estimate = 1000, actual_header = "x-tokens" }
"#,
        );
        let first = routes.find(&http::Method::GET, "/a").expect("a");
        assert_eq!(
            first.units,
            UnitsRule::Fixed(ledger::Units::new(3).expect("units"))
        );
        let second = routes.find(&http::Method::GET, "/b").expect("b");
        assert!(matches!(&second.units, UnitsRule::Reserve(reserve)
            if reserve.actual_header == "x-tokens" && reserve.estimate.get() == 1000 && reserve.ttl_secs == 300));
    }

    // A hold's time to live is `ttl_secs`; the old spelling `ttl_seconds` still works
    // (with a deprecation warning), and setting both is refused, naming the old one.
    #[test]
    fn reserve_ttl_secs_and_its_old_spelling() {
        let ttl_of = |reserve: &str| {
            let routes = routes(&format!(
                "[[routes]]\npath = \"/r\"\nfeature = \"f\"\nreserve = {{ estimate = 10, {reserve} }}\n"
            ));
            match &routes.find(&http::Method::GET, "/r").expect("r").units {
                UnitsRule::Reserve(reserve) => reserve.ttl_secs,
                other => panic!("not a reservation route: {other:?}"),
            }
        };
        assert_eq!(ttl_of("ttl_secs = 60"), 60);
        assert_eq!(ttl_of("ttl_seconds = 90"), 90);
        let both = "upstream = \"127.0.0.1:3000\"\n[control_plane]\nurl = \"http://127.0.0.1:8080\"\napi_key = \"k\"\n[[routes]]\npath = \"/r\"\nfeature = \"f\"\nreserve = { estimate = 10, ttl_secs = 60, ttl_seconds = 90 }\n";
        let config = Config::parse(both).expect("parses");
        let error = Routes::from_config(&config).expect_err("both spellings");
        assert!(error.setting.ends_with("reserve.ttl_seconds"), "{error:?}");
    }
}
