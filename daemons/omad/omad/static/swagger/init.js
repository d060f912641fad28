// Swagger UI (swagger-ui-dist 5.35.0, Apache-2.0, see LICENSE) pointed at this appliance's document.
window.onload = function () {
  window.ui = SwaggerUIBundle({ url: "/api/v1/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
};
