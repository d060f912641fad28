"""omad's HTTP edge: routes and their schemas, the auth and CORS middlewares, the OpenAPI document."""
