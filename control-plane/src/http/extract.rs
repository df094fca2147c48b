//! Extractors that answer in the API's own problem shape: the authenticated caller, JSON
//! bodies and query strings.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Request, header};
use serde::de::DeserializeOwned;

use super::idempotency::Incoming;
use crate::error::ApiError;
use crate::service::{AppState, Caller};

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        if let Some(Delegated(caller)) = parts.extensions.get::<Delegated>() {
            let caller = caller.clone();
            parts.extensions.insert(caller.env.clone());
            return Ok(caller);
        }
        let secret = presented_key(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let client = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let caller = state.authenticate(&secret, client).await?;
        parts.extensions.insert(caller.env.clone());
        Ok(caller)
    }
}

impl OptionalFromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Caller>, ApiError> {
        if presented_key(&parts.headers).is_none() && parts.extensions.get::<Delegated>().is_none()
        {
            return Ok(None);
        }
        <Caller as FromRequestParts<AppState>>::from_request_parts(parts, state)
            .await
            .map(Some)
    }
}

/// What an API handler starts from: the application's state and the caller its key
/// authenticated.
#[derive(Debug)]
pub struct Call {
    pub state: AppState,
    pub caller: Caller,
}

impl Call {
    /// The state and the caller, when the caller's key carries `scope`.
    ///
    /// # Errors
    /// 403 naming the scope otherwise.
    pub fn scoped(self, scope: crate::auth::Scope) -> Result<(AppState, Caller), ApiError> {
        self.caller.require(scope)?;
        Ok((self.state, self.caller))
    }
}

impl FromRequestParts<AppState> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Call, ApiError> {
        let caller =
            <Caller as FromRequestParts<AppState>>::from_request_parts(parts, state).await?;
        Ok(Call {
            state: state.clone(),
            caller,
        })
    }
}

/// The path's parameters (`/v1/…/{id}`), refused in the API's problem shape (400
/// `invalid_request`, naming what was wrong) where axum's own `Path` answers plain text:
/// an id whose escapes are not UTF-8 (`%FF`), say.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ApiPath<T>, ApiError> {
        let Path(value) = <Path<T> as FromRequestParts<S>>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::BadRequest {
                field: None,
                detail: rejection.body_text(),
            })?;
        Ok(ApiPath(value))
    }
}

/// A request that acts on the one object its path names (`POST /v1/…/{id}/…`): the
/// state, the caller, the object's id and the request as idempotency sees it.
#[derive(Debug)]
pub struct Act {
    pub state: AppState,
    pub caller: Caller,
    pub id: String,
    pub incoming: Incoming,
}

impl Act {
    /// The state, the caller, the object's id and the request.
    pub fn into_parts(self) -> (AppState, Caller, String, Incoming) {
        (self.state, self.caller, self.id, self.incoming)
    }
}

impl FromRequest<AppState> for Act {
    type Rejection = ApiError;

    async fn from_request(request: Request<Body>, state: &AppState) -> Result<Act, ApiError> {
        let (mut parts, body) = request.into_parts();
        let Call { state, caller } = Call::from_request_parts(&mut parts, state).await?;
        let ApiPath(id) =
            <ApiPath<String> as FromRequestParts<AppState>>::from_request_parts(&mut parts, &state)
                .await?;
        let incoming = Incoming::from_request(Request::from_parts(parts, body), &state).await?;
        Ok(Act {
            state,
            caller,
            id,
            incoming,
        })
    }
}

/// A caller authenticated before the request was made: the console signs a session in
/// once and sends its API calls through the router in process with this extension. A
/// request from the network cannot carry an extension, so only code in this process can
/// speak for a caller this way.
#[derive(Debug, Clone)]
pub struct Delegated(pub Caller);

/// `Authorization: Bearer <key>` or `X-API-Key: <key>`.
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.trim().to_owned())
}

/// Parses a JSON request body. An empty body parses as `{}` when `empty_ok`.
///
/// # Errors
/// 415 without a JSON content type; 400 naming the problem for malformed JSON, unknown
/// fields, wrong types or out-of-range numbers.
pub fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    empty_ok: bool,
) -> Result<T, ApiError> {
    if empty_ok && (body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null") {
        return serde_json::from_slice(b"{}").map_err(|error| ApiError::BadRequest {
            field: None,
            detail: error.to_string(),
        });
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !(essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json"))
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "send the body as JSON with `Content-Type: application/json` (got `{content_type}`)"
        )));
    }
    // Every body of this API is a JSON object; serde would also read a struct from an
    // array of its fields in order, which the document does not allow.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest {
            field: None,
            detail: "the body must be a JSON object".into(),
        });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = match serde_path_error(&mut deserializer) {
        Ok(value) => value,
        // JSON Schema counts `5.0` as an integer; serde does not. Only on this rare path
        // is the body read again with such numbers as integers.
        Err(error) => {
            return match whole_floats_as_integers(body) {
                None => Err(error),
                Some(result) => result.map_err(|error| ApiError::BadRequest {
                    field: None,
                    detail: format!("invalid body: {error}"),
                }),
            };
        }
    };
    deserializer.end().map_err(|error| ApiError::BadRequest {
        field: None,
        detail: format!("malformed JSON: {error}"),
    })?;
    Ok(value)
}

/// The largest integer every step of a float's path represents exactly (2^53).
const EXACT_FLOAT_INTEGER_MAX: f64 = 9_007_199_254_740_992.0;

/// `body` read with every number written with a zero fraction (`5.0`, `1e3`) taken as the
/// integer it is, when it is one a float holds exactly (|n| <= 2^53; larger ones are
/// refused rather than rounded: money is never guessed). `None` when the body holds no
/// such number (the first reading's error stands).
fn whole_floats_as_integers<T: DeserializeOwned>(
    body: &[u8],
) -> Option<Result<T, serde_json::Error>> {
    fn normalise(value: &mut serde_json::Value) -> bool {
        match value {
            serde_json::Value::Number(number) => {
                let whole = number
                    .as_f64()
                    .filter(|float| {
                        number.is_f64()
                            && float.fract() == 0.0
                            && float.abs() <= EXACT_FLOAT_INTEGER_MAX
                    })
                    // A whole number within 2^53 prints exactly, so it parses back exactly.
                    .and_then(|float| format!("{float:.0}").parse::<i64>().ok());
                match whole {
                    Some(integer) => {
                        *value = serde_json::Value::from(integer);
                        true
                    }
                    None => false,
                }
            }
            // Every item is normalised (no short circuit): `changed` only says whether
            // any was.
            serde_json::Value::Array(items) => {
                let mut changed = false;
                for item in items {
                    changed |= normalise(item);
                }
                changed
            }
            serde_json::Value::Object(fields) => {
                let mut changed = false;
                for item in fields.values_mut() {
                    changed |= normalise(item);
                }
                changed
            }
            _ => false,
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if !normalise(&mut value) {
        return None;
    }
    Some(serde_json::from_value(value))
}

fn serde_path_error<T: DeserializeOwned>(
    deserializer: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> Result<T, ApiError> {
    T::deserialize(deserializer).map_err(|error| {
        let detail = if error.is_syntax() || error.is_eof() {
            format!("malformed JSON: {error}")
        } else {
            format!("invalid body: {error}")
        };
        ApiError::BadRequest {
            field: None,
            detail,
        }
    })
}

/// Parses the request's query string into `T`.
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_query<T: DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|query| query.0)
        .map_err(|rejection| ApiError::BadRequest {
            field: None,
            detail: format!("invalid query: {}", rejection.body_text()),
        })
}

/// An `end_user_id` query parameter, required (`String`) or optional (`Option<String>`),
/// checked as an end user id.
pub trait EndUserParam {
    type Id;

    /// # Errors
    /// 422 naming `end_user_id` when it is not an end user id.
    fn check(&self) -> Result<Self::Id, ApiError>;
}

impl EndUserParam for String {
    type Id = ledger::EndUserId;

    fn check(&self) -> Result<ledger::EndUserId, ApiError> {
        Ok(protocol::end_user_id("end_user_id", self)?)
    }
}

impl EndUserParam for Option<String> {
    type Id = Option<ledger::EndUserId>;

    fn check(&self) -> Result<Option<ledger::EndUserId>, ApiError> {
        self.as_ref().map(EndUserParam::check).transpose()
    }
}

/// A query string's parameters, written with the API's rules once: unknown parameters
/// are refused, `end_user_id` (the first field, required or optional) carries the end
/// user id's constraints, and a struct followed by `paged` ends with the paging
/// parameters `cursor` and `limit` (1 to 500).
macro_rules! query_params {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { end_user_id: $end_user:ty, $($body:tt)* } paged
    ) => {
        $crate::http::extract::query_params!(
            $(#[$meta])*
            pub struct $name {
                end_user_id: $end_user,
                $($body)*
                /// Where the previous page ended (its `next_cursor`).
                #[param(min_length = 1)]
                pub cursor: Option<String>,
                /// How many at most, 1 to 500.
                #[param(minimum = 1, maximum = 500)]
                pub limit: Option<u32>,
            }
        );
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            end_user_id: $end_user:ty,
            $($(#[$field_meta:meta])* pub $field:ident: $field_type:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
        #[into_params(parameter_in = Query)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// The end user's id.
            #[param(min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1F\x7F-\x9F]+$")]
            pub end_user_id: $end_user,
            $($(#[$field_meta])* pub $field: $field_type,)*
        }

        impl $name {
            /// The request's query, with its `end_user_id` checked.
            ///
            /// # Errors
            /// 400 for a query that does not parse, 422 for an end user id that is not
            /// one.
            pub fn parse(
                uri: &axum::http::Uri,
            ) -> Result<(Self, <$end_user as $crate::http::extract::EndUserParam>::Id), $crate::error::ApiError> {
                let query: Self = $crate::http::extract::parse_query(uri)?;
                let end_user = $crate::http::extract::EndUserParam::check(&query.end_user_id)?;
                Ok((query, end_user))
            }
        }
    };
}
pub(crate) use query_params;
